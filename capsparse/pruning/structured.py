"""First-order structured pruning (CAP-f): attention-head and FFN-neuron masks, importance, compaction.

Masks are float buffers applied by forward pre-hooks, without patching any class:

- head mask ``[H]`` on the input of ``attention.output.dense`` (the concatenated heads, ``H * d_h``
  wide), which equals masking each head's attention probabilities (the context is linear in them);
- neuron mask ``[I]`` on the input of ``output.dense`` (the post-GELU FFN activations).

Importance (Michel et al. 2019, as the official code): ``I += |dL/dmask|`` per batch over the training
set, then each layer's head (neuron) scores divided by their L2 norm, a global ascending ranking of the
*active* units, and the lowest pruned until the cumulative target is reached. One head per layer is
protected; unlike the official code it is the best *active* head (the official ranks pruned heads too,
so a layer whose best head was already pruned lost its protection).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..sparsity import HEAD_MASK, NEURON_MASK
from ..sparsity import encoder_layers as _encoder_layers


def encoder_layers(model: nn.Module) -> List[nn.Module]:
    """:func:`capsparse.sparsity.encoder_layers`, which must find some."""
    layers = _encoder_layers(model)
    if not layers:
        raise ValueError(f"model: expected a BERT-family model with base_model.encoder.layer, got "
                         f"{type(model).__name__}")
    return layers


def _unit_mask_hook(owner: nn.Module, mask_name: str, probe_name: str):
    """Pre-hook of ``owner.dense``: its input times ``owner``'s unit mask (the importance probe while one is set),
    each unit's entry repeated over its features (``d_h`` per head, one per FFN neuron)."""
    def hook(module, args):
        mask = getattr(owner, probe_name)
        if mask is None:
            mask = getattr(owner, mask_name)
        x = args[0]
        per_unit = x.shape[-1] // mask.shape[0]
        return (x * mask.to(x.dtype).repeat_interleave(per_unit),) + tuple(args[1:])
    return hook


class StructuredMasks:
    """Head and FFN-neuron masks on a BERT-family model (pre-hooks, float buffers saved with the model)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = encoder_layers(model)
        self._handles = []
        for layer in self.layers:
            attn_out, ffn_out = layer.attention.output, layer.output
            n_heads = layer.attention.self.num_attention_heads
            n_neurons = layer.intermediate.dense.out_features
            dev = ffn_out.dense.weight.device
            if not hasattr(attn_out, HEAD_MASK):
                attn_out.register_buffer(HEAD_MASK, torch.ones(n_heads, device=dev))
            if not hasattr(ffn_out, NEURON_MASK):
                ffn_out.register_buffer(NEURON_MASK, torch.ones(n_neurons, device=dev))
            attn_out._cap_probe_head = None
            ffn_out._cap_probe_neuron = None
            self._handles.append(attn_out.dense.register_forward_pre_hook(
                _unit_mask_hook(attn_out, HEAD_MASK, "_cap_probe_head")))
            self._handles.append(ffn_out.dense.register_forward_pre_hook(
                _unit_mask_hook(ffn_out, NEURON_MASK, "_cap_probe_neuron")))

    # -- masks ----------------------------------------------------------------------------------------
    def head_masks(self) -> torch.Tensor:
        """``[L, H]`` float (1 = kept)."""
        return torch.stack([getattr(l.attention.output, HEAD_MASK) for l in self.layers])

    def neuron_masks(self) -> torch.Tensor:
        return torch.stack([getattr(l.output, NEURON_MASK) for l in self.layers])

    @torch.no_grad()
    def set_masks(self, head_masks: torch.Tensor, neuron_masks: torch.Tensor) -> None:
        for i, layer in enumerate(self.layers):
            getattr(layer.attention.output, HEAD_MASK).copy_(head_masks[i])
            getattr(layer.output, NEURON_MASK).copy_(neuron_masks[i])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- importance -----------------------------------------------------------------------------------
    def accumulate_importance(self, loss_fn: Callable[[dict], torch.Tensor], batches: Iterable[dict]
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``sum over batches of |dL_batch/d head_mask|``, same for neurons: ``([L, H], [L, I])``.

        Only the mask probes get gradients (``torch.autograd.grad``); parameter ``.grad`` is untouched.
        """
        probes_h = [getattr(l.attention.output, HEAD_MASK).detach().clone().requires_grad_(True) for l in self.layers]
        probes_n = [getattr(l.output, NEURON_MASK).detach().clone().requires_grad_(True) for l in self.layers]
        for layer, ph, pn in zip(self.layers, probes_h, probes_n):
            layer.attention.output._cap_probe_head = ph
            layer.output._cap_probe_neuron = pn
        imp_h = torch.zeros(len(self.layers), probes_h[0].numel(), device=probes_h[0].device)
        imp_n = torch.zeros(len(self.layers), probes_n[0].numel(), device=probes_n[0].device)
        try:
            for batch in batches:
                with torch.enable_grad():
                    loss = loss_fn(batch)
                    grads = torch.autograd.grad(loss, probes_h + probes_n, allow_unused=True)
                n = len(probes_h)
                for i in range(n):
                    if grads[i] is not None:
                        imp_h[i] += grads[i].abs()
                    if grads[n + i] is not None:
                        imp_n[i] += grads[n + i].abs()
        finally:
            for layer in self.layers:
                layer.attention.output._cap_probe_head = None
                layer.output._cap_probe_neuron = None
        return imp_h, imp_n


def select_units(importance: torch.Tensor, active: torch.Tensor, n_prune_total: int, protect_per_layer: int = 0
                 ) -> torch.Tensor:
    """New keep-mask ``[L, U]`` (bool) with ``n_prune_total`` units pruned in total (cumulative).

    ``importance`` is normalised per layer by its L2 norm (all units of the layer, as the official code),
    then the active, unprotected units are ranked globally in ascending order. The ``protect_per_layer``
    best *active* units of each layer are never pruned. Already-pruned units stay pruned.
    """
    active = active.bool()
    norm = importance.norm(dim=1, keepdim=True).clamp_min(1e-20)
    score = importance / norm
    already = int((~active).sum())
    need = max(0, int(n_prune_total) - already)
    candidates = active.clone()
    if protect_per_layer > 0:
        masked = torch.where(active, score, torch.full_like(score, -float("inf")))
        k = min(protect_per_layer, score.shape[1])
        top = masked.topk(k, dim=1).indices
        protected = torch.zeros_like(active)
        protected.scatter_(1, top, True)
        candidates &= ~protected
    flat_scores = torch.where(candidates, score, torch.full_like(score, float("inf"))).reshape(-1)
    need = min(need, int(candidates.sum()))
    keep = active.clone().reshape(-1)
    if need > 0:
        order = torch.argsort(flat_scores, stable=True)[:need]
        keep[order] = False
    return keep.reshape(active.shape)


def prune_count(total_units: int, fraction: float) -> int:
    """Cumulative number of units pruned at ``fraction`` (rounded down, as the official code: 14 of 144 at 10%)."""
    return int(round(fraction * total_units, 6))


def _slice_linear(linear: nn.Module, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None
                  ) -> nn.Linear:
    weight = linear.weight.detach()
    if hasattr(linear, "element_mask"):  # SparseLinear: bake its mask in
        weight = weight * linear.element_mask().to(weight.dtype)
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


@torch.no_grad()
def compact_model(model: nn.Module, masks: Optional[StructuredMasks] = None) -> dict:
    """Physically remove masked heads and FFN neurons (no ``prune_heads``); returns counts removed.

    Heads: rows of query/key/value and columns of ``attention.output.dense`` are sliced, and the
    attention module's ``num_attention_heads`` / ``all_head_size`` updated on the instance. Neurons:
    rows of ``intermediate.dense`` and columns of ``output.dense``. The hooks and mask buffers are removed.
    """
    layers = encoder_layers(model)
    if masks is not None:
        masks.remove()
    removed = {"heads": 0, "neurons": 0}
    for layer in layers:
        attn_self, attn_out, ffn_out = layer.attention.self, layer.attention.output, layer.output
        head_mask = getattr(attn_out, HEAD_MASK, None)
        neuron_mask = getattr(ffn_out, NEURON_MASK, None)
        d_h = attn_self.attention_head_size
        if head_mask is not None:
            keep_heads = torch.nonzero(head_mask > 0).reshape(-1)
            if keep_heads.numel() == 0:
                raise ValueError("compact_model: a layer has no active head left; expected at least one per layer")
            idx = (keep_heads[:, None] * d_h + torch.arange(d_h, device=keep_heads.device)).reshape(-1)
            for name in ("query", "key", "value"):
                setattr(attn_self, name, _slice_linear(getattr(attn_self, name), rows=idx))
            attn_out.dense = _slice_linear(attn_out.dense, cols=idx)
            removed["heads"] += attn_self.num_attention_heads - keep_heads.numel()
            attn_self.num_attention_heads = int(keep_heads.numel())
            attn_self.all_head_size = attn_self.num_attention_heads * d_h
            del attn_out._buffers[HEAD_MASK]
        if neuron_mask is not None:
            keep = torch.nonzero(neuron_mask > 0).reshape(-1)
            layer.intermediate.dense = _slice_linear(layer.intermediate.dense, rows=keep)
            ffn_out.dense = _slice_linear(ffn_out.dense, cols=keep)
            removed["neurons"] += neuron_mask.numel() - keep.numel()
            del ffn_out._buffers[NEURON_MASK]
    return removed
