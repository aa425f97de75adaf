"""Unstructured and block pruning criteria behind one interface: scores -> mask at a target.

Every pruner owns a list of ``(name, SparseLinear)`` layers and exposes:

- :meth:`Pruner.score_parameters`: learnable scores (their own optimizer group), ``[]`` for magnitude;
- :meth:`Pruner.update`: recompute every mask ONCE from the current scores at the scheduled value
  (the *density*, a kept fraction, for top-k criteria; the *sigmoid threshold* for soft movement). The
  pruning method (:mod:`capsparse.pruning.method`) calls it once per optimizer step, after
  ``optimizer.step()``; forwards never recompute masks;
- :meth:`Pruner.regularization`: the soft-movement L1 term (``None`` otherwise);
- :meth:`Pruner.remove`: drop hooks and score parameters, leaving plain ``SparseLinear`` layers.

Straight-through scores (movement, soft movement, block movement): the forward uses the fixed mask
``W' = M * W`` through the layer's own kernels, and a forward hook routes the layer output through
:class:`MovementScoreFunction`, whose backward adds ``dL/dS = (dL/dW') * W`` (summed per block for
block scores) from the layer's input and output gradient. The mask itself gets no gradient.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layout import check_sparsity, kept_count_for_density, topk_mask
from ..nn.sparse_linear import SparseLinear
from ..sparsity import sparsity_report
from ..surgery import sparse_layers
from .score_grad import BLOCK_SCORE_MODES, MovementScoreFunction, _block_sum  # noqa: F401  (re-exported)

SCORE_ATTR = "movement_scores"
#: "magnitude": scores start at the per-matrix standardised |W| (robust at short budgets, the default);
#: "constant": every score starts at ``score_init`` (official: 0.0)
SCORE_INIT_MODES = ("magnitude", "constant")
#: what ranks the units of the movement family: "learned" (scores trained by the optimizer on dL/dS = dL/dW' * W,
#: official movement pruning) or "saliency" (an EMA of |dL/dW' * W| times its uncertainty, as PLATON; not learned)
SCORE_CRITERIA = ("learned", "saliency")
SALIENCY_BUFFERS = ("saliency_mean", "saliency_uncertainty")


def _score_shape(layer: SparseLinear) -> torch.Size:
    return layer.mask.shape if layer.block_size is None else layer.block_mask.shape


def _exact_density(scores: torch.Tensor, density: float) -> float:
    """The kept fraction per-matrix top-k really keeps (a whole number of units)."""
    return kept_count_for_density(scores.numel(), density) / scores.numel()


@torch.no_grad()
def magnitude_anchor(layer: SparseLinear, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Initial scores ``offset + scale * (|W| - mean) / std`` per matrix (per block: the block sums of ``|W|``).

    Movement scores start from a converged model, where the mean weight gradient is about zero, so their first
    few hundred steps are mostly noise; with zero-initialised scores the first top-k cuts of a short run are
    then random or worse. Anchored scores make the early masks magnitude's; the score optimizer moves a score by
    at most about ``score_lr`` per step, so movement evidence overrides the anchor only where it is consistent.
    """
    s = layer.weight.detach().abs().float()
    if layer.block_size is not None:
        s = _block_sum(s, layer.block_size)
    std = s.std() if s.numel() > 1 else s.new_zeros(())
    z = (s - s.mean()) / std.clamp_min(torch.finfo(torch.float32).tiny)
    return (offset + scale * z).contiguous()


class Pruner:
    """Base class. ``layers``: ``(name, SparseLinear)`` pairs (default: every SparseLinear of ``model``)."""

    name = "base"

    def __init__(self, model: nn.Module, layers: Optional[Sequence[Tuple[str, SparseLinear]]] = None):
        self.model = model
        self.layers: List[Tuple[str, SparseLinear]] = list(layers) if layers is not None else sparse_layers(model)
        if not self.layers:
            raise ValueError(f"model: expected SparseLinear layers to prune in {type(model).__name__}, found none; "
                             f"call capsparse.sparsify(model) first")
        self.num_updates = 0
        self.last_value: Optional[float] = None

    # -- interface -----------------------------------------------------------------------------
    def score_parameters(self) -> List[nn.Parameter]:
        return []

    def score_tensors(self) -> List[torch.Tensor]:
        """What receives the score gradients (learned scores, saliency receptacles); none for magnitude."""
        return []

    def regularization(self) -> Optional[torch.Tensor]:
        return None

    @torch.no_grad()
    def update(self, value: float) -> None:
        """Recompute all masks from the scores at ``value`` (the density; soft movement: the sigmoid threshold)."""
        self._update(float(value))
        self.num_updates += 1
        self.last_value = float(value)

    def _update(self, value: float) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Remove hooks and score parameters (masks stay)."""

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def mask_numel(layer: SparseLinear) -> int:
        return (layer.mask if layer.block_size is None else layer.block_mask).numel()

    def check_reachable(self, sparsity: float, tolerance: float) -> None:
        """Raise before training when per-matrix top-k at ``sparsity`` cannot land within ``tolerance``
        (e.g. a block grid too coarse) or would empty a whole matrix."""
        check_sparsity(sparsity, "target_sparsity")
        density = 1.0 - sparsity
        kept = total = 0
        for name, layer in self.layers:
            n = self.mask_numel(layer)
            k = kept_count_for_density(n, density)
            if k == 0:
                unit = "weights" if layer.block_size is None else f"blocks of {layer.block_size}"
                raise ValueError(f"target_sparsity: {sparsity} is unreachable for {name}: it has {n} {unit}, so "
                                 f"keeping a fraction {density:g} keeps none (the matrix would be removed); "
                                 f"expected a target that keeps at least one unit per matrix")
            elem = layer.weight.numel() // n
            kept += k * elem
            total += n * elem
        reached = 1.0 - kept / total
        if abs(reached - sparsity) > tolerance:
            raise ValueError(f"target_sparsity: {sparsity} is unreachable with this layout: per-matrix top-k gives "
                             f"{reached:.4f}, off by more than sparsity_tolerance={tolerance}")

    @torch.no_grad()
    def mask_turnover(self) -> float:
        """Share of the currently kept units (weights, or blocks) that were pruned at the previous call: how much
        the mask is still changing (0 once it has settled). The first call compares with the dense start."""
        masks = [(layer.mask if layer.block_size is None else layer.block_mask).detach() for _, layer in self.layers]
        previous = getattr(self, "_turnover_masks", None)
        kept = new = 0
        for i, m in enumerate(masks):
            kept += int(m.sum())
            if previous is not None:
                new += int((m & ~previous[i]).sum())
        self._turnover_masks = [m.clone() for m in masks]
        return new / kept if kept else 0.0

    def sparsity(self) -> float:
        """The removed fraction of this pruner's layers (:func:`capsparse.sparsity.sparsity_report`)."""
        return sparsity_report(self.model, layers=self.layers).sparsity

    def state_dict(self) -> dict:
        state = {"num_updates": self.num_updates, "last_value": self.last_value}
        previous = getattr(self, "_turnover_masks", None)
        if previous is not None:  # mask_turnover's reference: the first log after a resume compares with it
            state["turnover_masks"] = [m.cpu() for m in previous]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state.get("num_updates", 0))
        self.last_value = state.get("last_value")
        if state.get("turnover_masks") is not None:
            self._turnover_masks = [m.to((layer.mask if layer.block_size is None else layer.block_mask).device)
                                    for m, (_, layer) in zip(state["turnover_masks"], self.layers)]


class MagnitudePruner(Pruner):
    """Top-k of ``|W|`` (per block: the sum of ``|W|``), per matrix (``scope="local"``, official) or over all
    layers at once (``scope="global"``)."""

    name = "magnitude"

    def __init__(self, model, layers=None, scope: str = "local"):
        super().__init__(model, layers)
        if scope not in ("local", "global"):
            raise ValueError(f"scope: expected 'local' or 'global', got {scope!r}")
        self.scope = scope

    def scores(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers:
            s = layer.weight.detach().abs().float()
            out[name] = s if layer.block_size is None else _block_sum(s, layer.block_size)
        return out

    def _update(self, density: float) -> None:
        scores = self.scores()
        if self.scope == "local":
            for name, layer in self.layers:
                layer.set_mask(topk_mask(scores[name], density), density=_exact_density(scores[name], density))
            return
        flat = torch.cat([scores[name].reshape(-1) for name, _ in self.layers])
        mask = topk_mask(flat, density)
        offset = 0
        for name, layer in self.layers:
            n = scores[name].numel()
            layer.set_mask(mask[offset:offset + n].reshape(scores[name].shape))
            offset += n

    def check_reachable(self, sparsity, tolerance):
        if self.scope == "local":
            super().check_reachable(sparsity, tolerance)
        else:
            check_sparsity(sparsity, "target_sparsity")


class _ScorePruner(Pruner):
    """Learnable scores (one per weight, or one per block), registered on each layer as the parameter
    ``movement_scores`` so that DDP reduces and the Trainer clips/saves them with the model."""

    def __init__(self, model, layers=None, score_init: float = 0.0, block_score_mode: str = "exact",
                 score_init_mode: str = "magnitude", score_init_scale: float = 1.0):
        super().__init__(model, layers)
        if block_score_mode not in BLOCK_SCORE_MODES:
            raise ValueError(f"block_score_mode: expected one of {BLOCK_SCORE_MODES}, got {block_score_mode!r}")
        if score_init_mode not in SCORE_INIT_MODES:
            raise ValueError(f"score_init_mode: expected one of {SCORE_INIT_MODES}, got {score_init_mode!r}")
        if not score_init_scale > 0:
            raise ValueError(f"score_init_scale: expected a number > 0, got {score_init_scale!r}")
        self.block_score_mode = block_score_mode
        self._handles = []
        for _, layer in self.layers:
            if not isinstance(getattr(layer, SCORE_ATTR, None), nn.Parameter):
                init = (magnitude_anchor(layer, score_init_scale, float(score_init)) if score_init_mode == "magnitude"
                        else torch.full(_score_shape(layer), float(score_init), dtype=torch.float32,
                                        device=layer.weight.device))
                self._attach_scores(layer, init)
            self._handles.append(layer.register_forward_hook(self._hook))

    def _attach_scores(self, layer: SparseLinear, init: torch.Tensor) -> None:
        layer.register_parameter(SCORE_ATTR, nn.Parameter(init))

    def _hook(self, layer, args, output):
        scores = getattr(layer, SCORE_ATTR, None)
        if scores is None or not torch.is_grad_enabled() or not scores.requires_grad:
            return output
        if not isinstance(scores, nn.Parameter) and scores.device != layer.weight.device:
            # a saliency receptacle is a plain attribute, so model.to(device) leaves it behind: follow the weight
            scores = torch.zeros_like(scores, device=layer.weight.device).requires_grad_(True)
            setattr(layer, SCORE_ATTR, scores)
        mode = self.block_score_mode if layer.block_size is not None else "exact"
        return MovementScoreFunction.apply(output, args[0], layer.weight, scores, layer, mode)

    def score_parameters(self) -> List[nn.Parameter]:
        return self.score_tensors()

    def score_tensors(self) -> List[torch.Tensor]:
        return [getattr(layer, SCORE_ATTR) for _, layer in self.layers]

    def scores(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(layer, SCORE_ATTR).detach() for name, layer in self.layers}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for _, layer in self.layers:
            for attr in (SCORE_ATTR, *SALIENCY_BUFFERS):
                if hasattr(layer, attr):
                    delattr(layer, attr)


class MovementPruner(_ScorePruner):
    """Movement pruning (CAP-m): per-matrix top-k of learnable scores (element or block scores).

    With block layouts, ``block_score_mode="exact"`` forms the dense ``dL/dW'`` for the score
    gradient (as nn_pruning does: pruned blocks keep moving and can come back); ``"fast"`` forms
    it on kept blocks only, and the trainer freezes the scores of pruned blocks
    (:meth:`freeze_pruned` / :meth:`restore_frozen`), so a pruned block never returns;
    ``"sampled"`` takes kept blocks exactly from the block-sparse dW and pruned blocks from an
    unbiased estimate over a token subsample (pruned blocks keep moving at a fraction of the cost).
    """

    name = "movement"

    def __init__(self, model, layers=None, score_criterion: str = "learned", saliency_betas=(0.85, 0.95), **kwargs):
        if score_criterion not in SCORE_CRITERIA:
            raise ValueError(f"score_criterion: expected one of {SCORE_CRITERIA}, got {score_criterion!r}")
        b1, b2 = (float(b) for b in saliency_betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"saliency_betas: expected two numbers in [0, 1), got {tuple(saliency_betas)!r}")
        self.score_criterion, self.saliency_betas = score_criterion, (b1, b2)
        super().__init__(model, layers, **kwargs)
        if score_criterion == "saliency":
            for _, layer in self.layers:
                for buf in SALIENCY_BUFFERS:
                    if getattr(layer, buf, None) is None:  # kept when a checkpoint's model already has them
                        layer.register_buffer(buf, torch.zeros(_score_shape(layer), dtype=torch.float32,
                                                               device=layer.weight.device))

    def _attach_scores(self, layer, init):
        if self.score_criterion == "learned":
            return super()._attach_scores(layer, init)
        # saliency: a receptacle for dL/dS (its value is never used), not a parameter the Trainer would train
        setattr(layer, SCORE_ATTR, torch.zeros_like(init).requires_grad_(True))

    def score_parameters(self) -> List[nn.Parameter]:
        # saliency scores are gradient receptacles only: the optimizer must not train (or decay) them
        return [] if self.score_criterion == "saliency" else super().score_parameters()

    def scores(self) -> Dict[str, torch.Tensor]:
        if self.score_criterion == "learned":
            return super().scores()
        return {name: layer.saliency_mean * layer.saliency_uncertainty for name, layer in self.layers}

    @torch.no_grad()
    def accumulate_saliency(self) -> None:
        """One EMA step from the score gradients of the last backward (``|dL/dW' * W|``, block sums for blocks):
        ``I <- b1 I + (1 - b1) |g|``, ``U <- b2 U + (1 - b2) ||g| - I|``; the ranking is ``I * U``. The
        receptacles' gradients are then cleared (they are not parameters, so the Trainer never zeroes them)."""
        b1, b2 = self.saliency_betas
        grads = [getattr(layer, SCORE_ATTR).grad for _, layer in self.layers]
        if any(g is None for g in grads):
            return
        from ..distributed import all_reduce_mean

        grads = [all_reduce_mean(g) for g in grads]
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            # a step the NaN guard skips (or an fp16 overflow) must not poison the averages for good
            for _, layer in self.layers:
                getattr(layer, SCORE_ATTR).grad = None
            return
        for (_, layer), g in zip(self.layers, grads):
            g = g.abs()
            layer.saliency_mean.mul_(b1).add_(g, alpha=1 - b1)
            layer.saliency_uncertainty.mul_(b2).add_((g - layer.saliency_mean).abs_(), alpha=1 - b2)
            getattr(layer, SCORE_ATTR).grad = None

    def _update(self, density: float) -> None:
        if self.score_criterion == "saliency":
            self.accumulate_saliency()
        for (_, layer), scores in zip(self.layers, self.scores().values()):
            # the exact kept fraction is known on the host: the layer picks dense or sparse kernels without a sync
            layer.set_mask(topk_mask(scores, density), density=_exact_density(scores, density))

    def freeze_pruned(self) -> None:
        """Remember the scores of pruned blocks (call before ``optimizer.step()``; fast mode)."""
        self._frozen = [getattr(layer, SCORE_ATTR).detach().clone() for _, layer in self.layers]

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Put back the remembered scores of pruned blocks (call after ``optimizer.step()``; fast mode)."""
        frozen = getattr(self, "_frozen", None)
        if frozen is None:
            return
        for (_, layer), saved in zip(self.layers, frozen):
            scores = getattr(layer, SCORE_ATTR)
            keep = layer.mask if layer.block_size is None else layer.block_mask
            scores.copy_(torch.where(keep, scores, saved))
        self._frozen = None

    @property
    def freezes_pruned(self) -> bool:
        return self.block_score_mode == "fast" and any(l.block_size is not None for _, l in self.layers)


class SoftMovementPruner(_ScorePruner):
    """Soft movement pruning (CAP-soft): ``M = sigmoid(S) > tau`` with at least ``min_keep`` of each matrix
    kept, and the L1 penalty ``mean_m mean(sigmoid(S_m))`` (scaled by ``lambda_t`` in the objective).
    The reached sparsity is not set directly: measure it with :meth:`sparsity`."""

    name = "soft-movement"

    def __init__(self, model, layers=None, score_init: float = 0.0, min_keep: float = 0.005, **kwargs):
        super().__init__(model, layers, score_init=score_init, **kwargs)
        self.min_keep = float(min_keep)

    def _update(self, sigmoid_threshold: float) -> None:
        for name, layer in self.layers:
            scores = getattr(layer, SCORE_ATTR).detach()
            mask = torch.sigmoid(scores) > sigmoid_threshold
            n = scores.numel()
            nb_min = int(self.min_keep * n) + 1  # as the official ThresholdBinarizer
            # the floor's top-k is always formed so that choosing between the two needs no host sync
            floor = topk_mask(scores, min(1.0, (nb_min + 0.5) / n))
            layer.set_mask(torch.where(mask.sum() < nb_min, floor, mask))

    def regularization(self) -> torch.Tensor:
        terms = [torch.sigmoid(s).sum() / s.numel() for s in self.score_parameters()]
        return torch.stack(terms).mean()

    def check_reachable(self, sparsity, tolerance):
        check_sparsity(sparsity, "target_sparsity")


PRUNERS = {"magnitude": MagnitudePruner, "movement": MovementPruner, "block-movement": MovementPruner,
           "soft-movement": SoftMovementPruner}


def build_pruner(method: str, model: nn.Module, layers=None, **kwargs) -> Pruner:
    """The pruner for ``method`` ("magnitude", "movement", "block-movement", "soft-movement")."""
    if method not in PRUNERS:
        raise ValueError(f"method: expected one of {tuple(PRUNERS)} for an unstructured/block pruner, got {method!r}")
    return PRUNERS[method](model, layers, **kwargs)
