"""Scaled dot-product attention for training on CPU, with :func:`capsparse.ops.dropout` on the probabilities.

With dropout, torch's CPU ``scaled_dot_product_attention`` has no fused kernel: it takes its math path, which
materialises the ``B x H x L x L`` probabilities anyway and draws their mask with ``bernoulli_`` (one thread)
and a ``_safe_softmax`` that scans every row for all-masked keys. This path materialises the same
probabilities with a plain softmax and the seed-determined dropout. Without dropout (eval, ``p = 0``) and off
CPU it is ``scaled_dot_product_attention`` itself. :func:`attention_reference` is the same math with the
reference dropout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backends.registry import resolve_backend
from ._checks import check_tensor
from .dropout import check_p, dropout


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # bool masks (True = attend, what transformers builds for sdpa) become large negative scores, as its eager
    # path does, so a row without keys gets uniform weights instead of NaN
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _math(q, k, v, mask, p: float, scale: Optional[float], backend: Optional[str]):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is not None:
        scores = scores + _additive(mask, scores.dtype)
    probs = dropout(torch.softmax(scores, dim=-1), p, backend=backend)
    return torch.matmul(probs, v)


def attention_reference(q, k, v, mask=None, p: float = 0.0, scale: Optional[float] = None):
    """The same math as :func:`attention` with the reference dropout (so the same mask under the same seed)."""
    return _math(q, k, v, mask, p, scale, "reference")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              p: float = 0.0, scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` with dropout ``p`` on the probabilities, times ``v``.

    Args:
        q, k, v: ``(B, H, L, d)`` (``k`` and ``v`` may have another length ``S``).
        mask: ``None``, a bool mask broadcastable to ``(B, H, L, S)`` (True = attend) or an additive float mask.
        p: dropout probability on the attention probabilities (pass 0 in eval).
        scale: score scale, default ``d ** -0.5``.
        backend: forced backend of the dropout (see :func:`capsparse.backends.resolve_backend`).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dims=4)
    p = check_p(p)
    if p == 0.0 or resolve_backend(q.device, backend, op="attention") not in ("cpu", "reference"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    return _math(q, k, v, mask, p, scale, backend)
