"""Plain PyTorch implementations of the backend primitives: the oracle and the fallback.

They favour clarity over speed but stay vectorised (no Python loop over blocks), so the reference
backend is usable on real models.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..layout import bitmap_from_blocks, bitmap_from_compressed, expand_bitmap


#: the contrastive primitive's normalisations (docs/design.md, "CAP contrastive loss, exactly"); every backend
#: and the op check against this one tuple
NORMALIZATIONS = ("official", "supcon")


def check_normalization(normalization) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")


def is_available() -> Tuple[bool, str]:
    return True, "always available"


def bsl_forward(x, weight, bias, row_ptr, row_cols, bm: int, bk: int):
    bitmap = bitmap_from_compressed(row_ptr, row_cols, weight.shape[1] // bk)
    return F.linear(x, weight * expand_bitmap(bitmap, (bm, bk)).to(weight.dtype), bias)


def bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm: int, bk: int):
    bitmap_t = bitmap_from_compressed(col_ptr, col_rows, weight.shape[0] // bm)
    return grad_y @ (weight * expand_bitmap(bitmap_t.t(), (bm, bk)).to(weight.dtype))


def bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm: int, bk: int):
    bitmap = bitmap_from_blocks(block_rows, block_cols, nnz, (grad_y.shape[1] // bm, x.shape[1] // bk))
    return (grad_y.t() @ x) * expand_bitmap(bitmap, (bm, bk)).to(x.dtype)


def masked_linear_forward(x, masked_weight, bias):
    return F.linear(x, masked_weight, bias)


def _finite_lse(logits):
    """Row log-sum-exp; a row whose every key is excluded gets 0 instead of -inf (no NaN downstream)."""
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _log_prob(q, k, exclude_index, temperature):
    """``(log_prob [B, K], keep [B, K])``: log-softmax over each row's keys, the excluded key dropped (0 there)."""
    logits = (q @ k.t()) / temperature
    keep = torch.ones_like(logits, dtype=torch.bool)
    has_ex = exclude_index >= 0
    rows = torch.arange(logits.shape[0], device=q.device)
    keep[rows[has_ex], exclude_index[has_ex]] = False
    logits = logits.masked_fill(~keep, float("-inf"))
    return (logits - _finite_lse(logits)).masked_fill(~keep, 0.0), keep


def contrastive_losses(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index,
                       temperature: float, normalization: str):
    """Differentiable CAP losses ``(loss_u, loss_s | None)`` on normalised ``q`` and ``k``.

    Builds ``B x K`` tensors: this is the oracle, the fused paths never do.
    """
    check_normalization(normalization)
    log_prob, keep = _log_prob(q, k, exclude_index, temperature)

    def one(positive):
        positive = positive & keep
        count = positive.sum(1)
        per_row = (log_prob * positive).sum(1) / count.clamp(min=1)
        if normalization == "official":
            return -per_row.sum() / count.sum().clamp(min=1)
        anchors = count > 0
        return -(per_row * anchors).sum() / anchors.sum().clamp(min=1)

    loss_u = one(query_ids[:, None] == key_ids[None, :])
    loss_s = None
    if query_labels is not None and key_labels is not None:
        loss_s = one(query_labels[:, None] == key_labels[None, :])
    return loss_u, loss_s


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index,
                    temperature: float, normalization: str):
    """Losses and their analytic gradients w.r.t. ``q`` (keys constant), with ``B x K`` temporaries.

    For row ``i`` with positives ``P_i``: ``d r_i / d q_i = (mean_{k in P_i} k - sum_k p_ik k) / tau``,
    and each loss is ``-c * sum_i r_i`` with ``c = 1 / sum_i |P_i|`` (official) or ``1 / |A|`` (supcon).
    """
    check_normalization(normalization)
    log_prob, keep = _log_prob(q, k, exclude_index, temperature)
    prob_keys = torch.exp(log_prob).masked_fill(~keep, 0.0) @ k

    def one(positive):
        positive = positive & keep
        count = positive.sum(1)
        per_row = (log_prob * positive).sum(1) / count.clamp(min=1)
        has = (count > 0).to(q.dtype)
        scale = 1.0 / (count.sum() if normalization == "official" else has.sum()).clamp(min=1).to(q.dtype)
        loss = -per_row.sum() * scale
        mean_pos = (positive.to(q.dtype) / count.clamp(min=1).unsqueeze(1).to(q.dtype)) @ k
        grad = -(scale / temperature) * (mean_pos - has.unsqueeze(1) * prob_keys)
        return loss, grad

    loss_u, grad_u = one(query_ids[:, None] == key_ids[None, :])
    loss_s = grad_s = None
    if query_labels is not None and key_labels is not None:
        loss_s, grad_s = one(query_labels[:, None] == key_labels[None, :])
    return loss_u, loss_s, grad_u, grad_s


# -- dropout (capsparse.ops.dropout): Philox4x32-10 in int64 tensor ops, the words the cpu kernel computes
_M32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: torch.Tensor, m: int):
    # a * m overflows int64 for 32-bit a and m: multiply by m's 16-bit halves
    t, u = a * (m & 0xFFFF), a * (m >> 16)
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & _M32


def philox_words(n: int, seed: torch.Tensor, device=None) -> torch.Tensor:
    """The first ``n`` 32-bit words (as int64) of the stream that decides element ``i``; ``seed``: int64 scalar."""
    ctr = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c0, c1 = ctr & _M32, ctr >> 32
    c2 = c3 = torch.zeros_like(ctr)
    seed = seed.to(device)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _MUL[0])
        hi1, lo1 = _mulhilo(c2, _MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _M32, (k1 + _WEYL[1]) & _M32
    return torch.stack([c0, c1, c2, c3], dim=1).reshape(-1)[:n]


def keep_threshold(p: float) -> int:
    return int((1.0 - p) * 2 ** 32)


def dropout(x, p: float, seed):
    keep = philox_words(x.numel(), seed, x.device) < keep_threshold(p)
    return x * keep.reshape(x.shape).to(x.dtype) * (1.0 / (1.0 - p))
