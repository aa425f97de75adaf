"""Straight-through score gradients of movement pruning: ``dL/dS = (dL/dW') * W`` (block sums for blocks).

Modes of :class:`MovementScoreFunction` (block layouts; element masks always use ``"exact"``):

* ``"exact"``: ``dL/dW' = g^T x`` formed densely, a dense GEMM per layer and step;
* ``"fast"``: ``dL/dW'`` on kept blocks only (block-sparse dW); pruned blocks get no gradient;
* ``"sampled"``: kept blocks exact (block-sparse dW); pruned blocks from an unbiased estimate over a
  uniform subsample of ``ceil(sample_fraction * T)`` tokens drawn without replacement, scaled by
  ``T / S`` (``E[estimate] = g^T x`` exactly). Cost: the sparse dW plus ``sample_fraction`` of a dense
  GEMM instead of a whole one.

:func:`score_grad_reference` is the plain dense formula the modes are tested against.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..ops.block_sparse_linear import block_sparse_grad_weight, grad_weight_offer, kept_block_sums

#: share of the tokens used for the pruned blocks' estimate in ``"sampled"`` mode
SAMPLE_FRACTION = 0.125
#: the modes above; CAPConfig.block_score_mode and MovementPruner take these
BLOCK_SCORE_MODES = ("exact", "fast", "sampled")


def _block_sum(t: torch.Tensor, block_size: Tuple[int, int]) -> torch.Tensor:
    n, k = t.shape
    bm, bk = block_size
    return t.reshape(n // bm, bm, k // bk, bk).sum(dim=(1, 3))


def score_grad_reference(g2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                         block_size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """``(g^T x) * W`` in fp32, block-summed when ``block_size`` is given."""
    prod = (g2.t().double() @ x2.double()).float() * weight.float()
    return prod if block_size is None else _block_sum(prod, block_size)


def sample_tokens(t: int, fraction: float, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``ceil(fraction * t)`` distinct token indices, uniformly at random (at least 1 when ``t > 0``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"sample_fraction: expected a number in (0, 1], got {fraction!r}")
    s = min(t, max(1, math.ceil(fraction * t))) if t else 0
    return torch.randperm(t, device=device, generator=generator)[:s]


def _kept_block_grad(layer, layout, g2, x2):
    # the functional op resolves the layer's backend; only the kept blocks [nnz, bm, bk] (no zero-filled [N, K])
    return block_sparse_grad_weight(g2, x2, layout, backend=layer.backend, compact=True)


def sampled_block_score_grad(layer, layout, g2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                             fraction: float = SAMPLE_FRACTION, generator: Optional[torch.Generator] = None,
                             blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block scores' gradient: kept blocks exact, pruned blocks the unbiased token-subsample estimate.
    ``blocks``: the kept-block ``g^T x`` if already formed (``[nnz, bm, bk]``)."""
    if blocks is None:
        blocks = _kept_block_grad(layer, layout, g2, x2)
    kept = kept_block_sums(blocks, weight, layout)
    t = x2.shape[0]
    idx = sample_tokens(t, fraction, x2.device, generator)
    gs, xs = g2.index_select(0, idx).to(weight.dtype), x2.index_select(0, idx).to(weight.dtype)
    est = (gs.t() @ xs).float() * weight.float()
    est = _block_sum(est, layout.block_size) * (t / max(idx.numel(), 1))
    return torch.where(layer.block_mask, kept, est)


class MovementScoreFunction(torch.autograd.Function):
    """Identity on the layer output; backward sends ``(dL/dW') * W`` to the scores (see the module doc)."""

    @staticmethod
    def forward(ctx, output, x, weight, scores, layer, mode: str):
        if mode not in BLOCK_SCORE_MODES:
            raise ValueError(f"mode: expected one of {BLOCK_SCORE_MODES}, got {mode!r}")
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.mode = layer, mode
        blocky = mode in ("fast", "sampled") and layer.block_size is not None
        ctx.layout = layer.layout if blocky else None
        # the layer's own backward takes the product formed here instead of forming it again
        ctx.offer = grad_weight_offer(output) if weight.requires_grad else None
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):
        grad_scores = None
        if ctx.needs_input_grad[3]:
            x, weight = ctx.saved_tensors
            # contiguous once here (the reshape below would copy anyway): the layer's backward then receives
            # this same memory and can take the product formed here (GradWeightOffer)
            grad_out = grad_out.contiguous()
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            layer, layout, offer = ctx.layer, ctx.layout, ctx.offer
            if layout is not None:  # fast / sampled: the kept blocks from the block-sparse dW
                blocks = _kept_block_grad(layer, layout, g2, x2)
                if offer is not None:
                    offer.give(grad_out, blocks=blocks)
                if ctx.mode == "sampled":
                    grad_scores = sampled_block_score_grad(layer, layout, g2, x2, weight, blocks=blocks)
                else:
                    grad_scores = kept_block_sums(blocks, weight, layout)
                return grad_out, None, None, grad_scores, None, None
            grad_wp = g2.t().to(weight.dtype) @ x2.to(weight.dtype)
            if offer is not None:
                offer.give(grad_out, dense=grad_wp)
            prod = grad_wp.float() * weight.float()
            if layer.block_size is not None:
                prod = _block_sum(prod, layer.block_size)
            grad_scores = prod
        return grad_out, None, None, grad_scores, None, None
