"""CAP's contrastive loss: one shared softmax over all keys, id (unsupervised) and label
(supervised) positives, self-exclusion, and the official or the textbook normalisation.

The exact definition is in ``docs/design.md``. :func:`cap_contrastive_loss_reference` builds the
``B x K`` logits with plain PyTorch; the backends' ``cap_contrastive`` computes the losses and
their gradient w.r.t. the normalised query without ``B x K`` masks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..backends import reference as _reference
from ..backends.reference import NORMALIZATIONS, check_normalization
from ..backends.registry import get_backend, resolve_backend
from ._autocast import autocast_off
from ._checks import check_tensor

_INT_DTYPES = (torch.int64, torch.int32)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # fp32 accumulation for half types; fp64 stays fp64 (gradcheck)
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _validate(query, keys, query_ids, key_ids, query_labels, key_labels, temperature, normalization,
              exclude_index):
    check_tensor("query", query, dims=2)
    check_tensor("keys", keys, dims=2)
    b, d = query.shape
    if keys.shape[1] != d:
        raise ValueError(f"keys: expected shape (K, {d}) to match query's dim, got {tuple(keys.shape)}")
    if keys.device != query.device:
        raise ValueError(f"keys: expected device {query.device} (the query's), got {keys.device}")
    for name, value, n in (("query_ids", query_ids, b), ("key_ids", key_ids, keys.shape[0])):
        check_tensor(name, value, dims=1, dtypes=_INT_DTYPES)
        if value.shape[0] != n or value.device != query.device:
            raise ValueError(f"{name}: expected shape ({n},) on {query.device}, got {tuple(value.shape)} on "
                             f"{value.device}")
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels, key_labels: expected both or neither, got only "
                         f"{'query_labels' if key_labels is None else 'key_labels'}")
    if query_labels is not None:
        for name, value, n in (("query_labels", query_labels, b), ("key_labels", key_labels, keys.shape[0])):
            if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dim() != 1 \
                    or value.shape[0] != n:
                raise ValueError(f"{name}: expected an integer tensor of shape ({n},) (class labels; regression "
                                 f"targets must be binned first), got {getattr(value, 'dtype', type(value))} "
                                 f"{tuple(getattr(value, 'shape', ()))}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    check_normalization(normalization)
    if exclude_index is not None:
        check_tensor("exclude_index", exclude_index, dims=1, dtypes=_INT_DTYPES)
        if exclude_index.shape[0] != b:
            raise ValueError(f"exclude_index: expected shape ({b},), got {tuple(exclude_index.shape)}")
        n_keys = keys.shape[0]
        in_range = ((exclude_index >= -1) & (exclude_index < n_keys)).all()
        if exclude_index.device.type == "cpu":
            if not bool(in_range):
                bad = exclude_index[(exclude_index < -1) | (exclude_index >= n_keys)][:5].tolist()
                raise ValueError(f"exclude_index: expected values in [-1, {n_keys}) (a key index, or -1 for none), "
                                 f"got {bad}")
        else:  # no host sync on accelerators
            torch._assert_async(in_range, f"exclude_index: expected values in [-1, {n_keys})")


def cap_contrastive_loss_reference(query, keys, query_ids, key_ids, query_labels=None, key_labels=None,
                                   temperature=0.1, normalization="official", exclude_index=None):
    """Plain PyTorch oracle; differentiable w.r.t. ``query`` and ``keys``."""
    dt = _compute_dtype(query)
    q = F.normalize(query.to(dt), dim=1)
    k = F.normalize(keys.to(dt), dim=1)
    if exclude_index is None:
        exclude_index = torch.full((query.shape[0],), -1, dtype=torch.int64, device=query.device)
    return _reference.contrastive_losses(q, k, query_ids.long(), key_ids.long(),
                                         None if query_labels is None else query_labels.long(),
                                         None if key_labels is None else key_labels.long(),
                                         exclude_index.long(), float(temperature), normalization)


@torch.library.custom_op("capsparse::cap_contrastive", mutates_args=())
def _cap_contrastive(q: torch.Tensor, k: torch.Tensor, query_ids: torch.Tensor, key_ids: torch.Tensor,
                     query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
                     exclude_index: torch.Tensor, temperature: float, normalization: str,
                     backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss_u, loss_s, grad_u, grad_s = get_backend(backend).cap_contrastive(
        q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature, normalization)
    if loss_s is None:  # custom ops return tensors only: zeros stand for "no supervised term"
        loss_s, grad_s = torch.zeros_like(loss_u), torch.zeros_like(grad_u)
    return loss_u.to(q.dtype).clone(), loss_s.to(q.dtype).clone(), grad_u.contiguous(), grad_s.contiguous()


@_cap_contrastive.register_fake
def _(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature, normalization, backend):
    scalar = q.new_empty(())
    return scalar, scalar.clone(), torch.empty_like(q), torch.empty_like(q)


class CAPContrastiveFunction(torch.autograd.Function):
    """Losses from the fused primitive; backward scales the saved per-loss query gradients."""

    @staticmethod
    def forward(ctx, q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature,
                normalization, backend):
        loss_u, loss_s, grad_u, grad_s = _cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels,
                                                          exclude_index, temperature, normalization, backend)
        ctx.save_for_backward(grad_u, grad_s)
        return loss_u, loss_s

    @staticmethod
    def backward(ctx, g_u, g_s):
        grad_u, grad_s = ctx.saved_tensors
        grad_q = grad_u * g_u.to(grad_u.dtype) + grad_s * g_s.to(grad_s.dtype)
        return grad_q, None, None, None, None, None, None, None, None, None


def cap_contrastive_loss(query: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor, key_ids: torch.Tensor,
                         query_labels: Optional[torch.Tensor] = None, key_labels: Optional[torch.Tensor] = None,
                         temperature: float = 0.1, normalization: str = "official",
                         exclude_index: Optional[torch.Tensor] = None,
                         backend: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CAP's per-bank contrastive losses ``(loss_unsupervised, loss_supervised)``.

    Args:
        query: ``(B, D)`` student representations (gradients flow through them).
        keys: ``(K, D)`` detached keys (bank vectors, extras, the batch's own detached queries).
        query_ids, key_ids: ``(B,)``, ``(K,)`` example ids; equal ids are unsupervised positives.
        query_labels, key_labels: optional ``(B,)``, ``(K,)`` class labels (supervised positives).
        temperature: softmax temperature ``tau``.
        normalization: ``"official"`` (divide by the total number of positives, as the official code)
            or ``"supcon"`` (mean over anchors that have a positive).
        exclude_index: ``(B,)`` index of the key left out of row ``i``'s softmax and positives
            (its own detached copy), ``-1`` for none.

    Both inputs are L2-normalised inside. The second loss is ``None`` without labels. When
    ``keys`` requires grad the reference path runs (the fused paths treat keys as constants). The
    loss is computed in fp32 (fp64 for fp64 queries) whatever the input dtypes, also under autocast.
    """
    _validate(query, keys, query_ids, key_ids, query_labels, key_labels, temperature, normalization, exclude_index)
    if exclude_index is None:
        exclude_index = torch.full((query.shape[0],), -1, dtype=torch.int64, device=query.device)
    name = resolve_backend(query.device, backend, op="cap_contrastive_loss")
    with autocast_off(query.device):
        if keys.requires_grad or (name == "reference" and backend is None):
            return cap_contrastive_loss_reference(query, keys, query_ids, key_ids, query_labels, key_labels,
                                                  temperature, normalization, exclude_index)
        dt = _compute_dtype(query)
        q = F.normalize(query.to(dt), dim=1)
        k = F.normalize(keys.detach().to(dt), dim=1).contiguous()
        labels = (None, None) if query_labels is None else (query_labels.long(), key_labels.long())
        loss_u, loss_s = CAPContrastiveFunction.apply(q.contiguous(), k, query_ids.long(), key_ids.long(), *labels,
                                                      exclude_index.long(), float(temperature), normalization, name)
    return loss_u, (loss_s if query_labels is not None else None)
