"""Fused CAP contrastive loss: online log-sum-exp over key tiles, split over the keys.

CAP loss, exactly as in docs/design.md: ``s_ik = q_i . k_k / tau``; key ``e_i = exclude_index[i]``
(if >= 0) is removed from the softmax and from the positives; ``lse_i = logsumexp_{k != e_i} s_ik``;
``l_ik = s_ik - lse_i``; ``P^u_i = {k != e_i : key_ids[k] == query_ids[i]}``,
``P^s_i = {k != e_i : key_labels[k] == query_labels[i]}``.

* ``official``: ``L = - sum_i (1/|P_i|) sum_{k in P_i} l_ik / sum_i |P_i|`` (0 if no positive at all)
* ``supcon``:   ``L = - (1/|A|) sum_{i in A} (1/|P_i|) sum_{k in P_i} l_ik``, ``A = {i : |P_i| > 0}``

How it is computed (no ``B x K`` tensor is ever formed):

* CAP's shapes are a small batch (B = 32) against a large bank (K = 4k-16k keys), so one program
  per query tile would leave a GPU idle. Both kernels split the keys (flash-decoding style): program
  ``(row tile, split)`` covers ``KEYS_PER_SPLIT`` keys, and the splits are merged afterwards with
  O(splits * B) torch ops (forward) or one fixed-order sum (backward, deterministic).
* forward: ``S = Q K^T / tau`` tiles with fp32 accumulation, online max / sum (base-2
  exponentials); positives are decided on the fly from the id / label vectors, and per row and split
  it accumulates ``|P_i|`` and ``sum_{k in P_i} s_ik`` for both positive sets. Then
  ``sum_{k in P_i} l_ik = sum_s_i - |P_i| lse_i``.
* backward recomputes the S tiles: ``dL/ds_ik = c (w_i [k in P_i] - h_i p_ik)`` with ``p = softmax``,
  ``w_i = 1/|P_i|`` (0 without positives), ``h_i = [|P_i| > 0]``, ``c = -1/denominator``, and
  ``dq_i = (1/tau) sum_k dL/ds_ik k_k`` on a grid of (query tiles, D-chunks, key splits) into an fp32
  workspace. The per-row coefficients are normalised to magnitude <= 1 and the global factor is
  applied after the fp32 accumulation, so fp16 tiles of ``dL/ds`` do not underflow.

Keys are constants (the public op runs the reference when keys need a gradient). For D larger
than one output chunk the backward recomputes S once per D-chunk (docs/triton.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends.reference import check_normalization
from ._common import check_device_usable, check_tensor, dot_flags, interpreting, launch_guard

__all__ = ["cap_contrastive", "cap_contrastive_stats", "contrastive_config", "contrastive_meta"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@triton.jit
def _scores_tile(q_ptr, k_ptr, offs_b, offs_n, b_in, n_in, D,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, IN_PREC: tl.constexpr):
    """``Q[offs_b] @ K[offs_n]^T`` in fp32 over the full feature dimension."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d < D
        qt = tl.load(q_ptr + offs_b[:, None] * D + offs_d[None, :], mask=b_in[:, None] & d_in[None, :], other=0.0)
        kt = tl.load(k_ptr + offs_n[:, None] * D + offs_d[None, :], mask=n_in[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(qt, tl.trans(kt), acc, input_precision=IN_PREC)
    return acc


@triton.jit
def _cap_fwd_kernel(
    q_ptr, k_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, excl_ptr,
    stats_ptr,  # fp32 [6, SPLITS, B]: running max (base 2), sum of exp2, cnt_u, sum_u, cnt_s, sum_s
    inv_tau, B, NK, D, SPLITS, KEYS_PER_SPLIT,
    HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_in = offs_b < B
    qid = tl.load(qid_ptr + offs_b, mask=b_in, other=0)
    excl = tl.load(excl_ptr + offs_b, mask=b_in, other=-1)
    if HAS_LABELS:
        qlab = tl.load(qlab_ptr + offs_b, mask=b_in, other=0)

    m2 = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)  # running max of s * log2(e)
    l = tl.zeros((BLOCK_B,), dtype=tl.float32)
    cnt_u = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sum_u = tl.zeros((BLOCK_B,), dtype=tl.float32)
    cnt_s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sum_s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    k_lo = split * KEYS_PER_SPLIT
    k_hi = tl.minimum(k_lo + KEYS_PER_SPLIT, NK)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_in = offs_n < k_hi
        s = _scores_tile(q_ptr, k_ptr, offs_b, offs_n, b_in, n_in, D, BLOCK_B, BLOCK_N, BLOCK_D, UPCAST,
                         IN_PREC) * inv_tau
        valid = n_in[None, :] & (offs_n[None, :] != excl[:, None])
        s2 = tl.where(valid, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m2, tl.max(s2, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet
        l = l * tl.exp2(m2 - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
        m2 = m_new

        kid = tl.load(kid_ptr + offs_n, mask=n_in, other=0)
        pos = valid & (kid[None, :] == qid[:, None])
        cnt_u += tl.sum(pos.to(tl.float32), axis=1)
        sum_u += tl.sum(tl.where(pos, s, 0.0), axis=1)
        if HAS_LABELS:
            klab = tl.load(klab_ptr + offs_n, mask=n_in, other=0)
            pos_s = valid & (klab[None, :] == qlab[:, None])
            cnt_s += tl.sum(pos_s.to(tl.float32), axis=1)
            sum_s += tl.sum(tl.where(pos_s, s, 0.0), axis=1)

    row = split.to(tl.int64) * B + offs_b
    plane = SPLITS.to(tl.int64) * B
    tl.store(stats_ptr + row, m2, mask=b_in)
    tl.store(stats_ptr + plane + row, l, mask=b_in)
    tl.store(stats_ptr + 2 * plane + row, cnt_u, mask=b_in)
    tl.store(stats_ptr + 3 * plane + row, sum_u, mask=b_in)
    if HAS_LABELS:
        tl.store(stats_ptr + 4 * plane + row, cnt_s, mask=b_in)
        tl.store(stats_ptr + 5 * plane + row, sum_s, mask=b_in)


@triton.jit
def _grad_tile(s, valid, lse, qid, kid, qlab, klab, a_u, a_s, beta, HAS_LABELS: tl.constexpr):
    """Normalised ``dL/ds`` tile: ``a_u [k in P^u] + a_s [k in P^s] - beta * p``."""
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    g = tl.where(valid & (kid[None, :] == qid[:, None]), a_u[:, None], 0.0) - beta[:, None] * p
    if HAS_LABELS:
        g += tl.where(valid & (klab[None, :] == qlab[:, None]), a_s[:, None], 0.0)
    return g


@triton.jit
def _cap_bwd_dq_kernel(
    q_ptr, k_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, excl_ptr, lse_ptr,
    coef_ptr,  # fp32 [NUM_OUT, 3, B]: a_u, a_s, beta
    ws_ptr,  # fp32 [NUM_OUT, SPLITS, B, D]: per-split partial sum_k g_ik k_k
    inv_tau, B, NK, D, SPLITS, KEYS_PER_SPLIT,
    NUM_OUT: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_in = offs_b < B
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_in = offs_do < D
    qid = tl.load(qid_ptr + offs_b, mask=b_in, other=0)
    excl = tl.load(excl_ptr + offs_b, mask=b_in, other=-1)
    lse = tl.load(lse_ptr + offs_b, mask=b_in, other=0.0)
    qlab = qid
    if HAS_LABELS:
        qlab = tl.load(qlab_ptr + offs_b, mask=b_in, other=0)
    a_u0 = tl.load(coef_ptr + 0 * B + offs_b, mask=b_in, other=0.0)
    a_s0 = tl.load(coef_ptr + 1 * B + offs_b, mask=b_in, other=0.0)
    be0 = tl.load(coef_ptr + 2 * B + offs_b, mask=b_in, other=0.0)
    acc0 = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    if NUM_OUT == 2:
        a_u1 = tl.load(coef_ptr + 3 * B + offs_b, mask=b_in, other=0.0)
        a_s1 = tl.load(coef_ptr + 4 * B + offs_b, mask=b_in, other=0.0)
        be1 = tl.load(coef_ptr + 5 * B + offs_b, mask=b_in, other=0.0)
        acc1 = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)

    k_lo = split * KEYS_PER_SPLIT
    k_hi = tl.minimum(k_lo + KEYS_PER_SPLIT, NK)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_in = offs_n < k_hi
        s = _scores_tile(q_ptr, k_ptr, offs_b, offs_n, b_in, n_in, D, BLOCK_B, BLOCK_N, BLOCK_D, UPCAST,
                         IN_PREC) * inv_tau
        valid = n_in[None, :] & (offs_n[None, :] != excl[:, None])
        kid = tl.load(kid_ptr + offs_n, mask=n_in, other=0)
        klab = kid
        if HAS_LABELS:
            klab = tl.load(klab_ptr + offs_n, mask=n_in, other=0)
        kt = tl.load(k_ptr + offs_n[:, None] * D + offs_do[None, :], mask=n_in[:, None] & do_in[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        g0 = _grad_tile(s, valid, lse, qid, kid, qlab, klab, a_u0, a_s0, be0, HAS_LABELS)
        acc0 = tl.dot(g0.to(kt.dtype), kt, acc0, input_precision=IN_PREC)
        if NUM_OUT == 2:
            g1 = _grad_tile(s, valid, lse, qid, kid, qlab, klab, a_u1, a_s1, be1, HAS_LABELS)
            acc1 = tl.dot(g1.to(kt.dtype), kt, acc1, input_precision=IN_PREC)

    out_mask = b_in[:, None] & do_in[None, :]
    out_offs = (split.to(tl.int64) * B + offs_b[:, None]) * D + offs_do[None, :]
    tl.store(ws_ptr + out_offs, acc0, mask=out_mask)
    if NUM_OUT == 2:
        tl.store(ws_ptr + SPLITS.to(tl.int64) * B * D + out_offs, acc1, mask=out_mask)


# ---------------------------------------------------------------------------------------------
# launch configs and launchers
# ---------------------------------------------------------------------------------------------

# GPU configs (not timed; chosen from the ptxas register/spill report of tests/test_triton_aot.py,
# for fp32 inputs, which the public op always passes): S tiles of 32 query rows x 64 keys (32 keys in
# the backward, which holds two accumulators), 8 warps.
_GPU_FWD = dict(BLOCK_B=32, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=2)
_GPU_BWD = dict(BLOCK_B=32, BLOCK_N=32, BLOCK_D=64, BLOCK_DO=32, num_warps=8, num_stages=2)
_INTERP = dict(BLOCK_B=16, BLOCK_N=16, BLOCK_D=32, BLOCK_DO=32, num_warps=1, num_stages=1)
# programs to aim for: 2 waves on an H100's 132 SMs; under the interpreter a few, so tests split
_TARGET_PROGRAMS_GPU, _TARGET_PROGRAMS_INTERP = 264, 3


def contrastive_config(kind: str, device: torch.device, B: int, NK: int, D: int, gpu: Optional[bool] = None) -> dict:
    """Launch config for ``kind`` in {"fwd", "dq"} with the key split: ``SPLITS`` x ``KEYS_PER_SPLIT``.

    Host-side arithmetic on shapes only. Small batches get a 16/32-row tile (``tl.dot`` needs 16).
    ``gpu`` overrides the device test (ahead-of-time checks ask for the GPU config without a GPU).
    """
    if gpu is None:
        gpu = device.type == "cuda" and not interpreting()
    if not gpu:
        cfg, target = dict(_INTERP), _TARGET_PROGRAMS_INTERP
    else:
        cfg, target = dict(_GPU_FWD if kind == "fwd" else _GPU_BWD), _TARGET_PROGRAMS_GPU
        cfg["BLOCK_B"] = min(cfg["BLOCK_B"], max(16, triton.next_power_of_2(max(B, 1))))
    tiles = triton.cdiv(B, cfg["BLOCK_B"]) * (triton.cdiv(D, cfg["BLOCK_DO"]) if kind == "dq" else 1)
    key_tiles = max(1, triton.cdiv(NK, cfg["BLOCK_N"]))
    splits = max(1, min(key_tiles, target // max(tiles, 1)))
    kps = triton.cdiv(key_tiles, splits) * cfg["BLOCK_N"]
    cfg["KEYS_PER_SPLIT"] = kps
    cfg["SPLITS"] = max(1, triton.cdiv(NK, kps))
    return cfg


def contrastive_meta(kind: str, cfg: dict, dtype: torch.dtype, has_labels: bool, num_out: int = 1):
    """``(constexprs, options)`` of the ``kind`` kernel for ``cfg`` (shared with tests/test_triton_aot.py)."""
    meta = dict(HAS_LABELS=has_labels, BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                **dot_flags(dtype))
    if kind == "dq":
        meta.update(NUM_OUT=num_out, BLOCK_DO=cfg["BLOCK_DO"])
    return meta, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _inv_tau(temperature) -> float:
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature: expected a positive float, got {temperature}")
    return 1.0 / t


def _check_inputs(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index):
    check_tensor("q", q, ndim=2, dtypes=_FLOATS)
    check_device_usable("q", q)
    B, D = q.shape
    check_tensor("k", k, ndim=2, dtype=q.dtype, device=q.device)
    if k.shape[1] != D:
        raise ValueError(f"k: expected shape (K, {D}) (same D as q), got {tuple(k.shape)}")
    NK = k.shape[0]
    check_tensor("query_ids", query_ids, ndim=1, dtype=torch.int64, device=q.device, shape=(B,))
    check_tensor("key_ids", key_ids, ndim=1, dtype=torch.int64, device=q.device, shape=(NK,))
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels, key_labels: expected both tensors or both None")
    if query_labels is not None:
        check_tensor("query_labels", query_labels, ndim=1, dtype=torch.int64, device=q.device, shape=(B,))
        check_tensor("key_labels", key_labels, ndim=1, dtype=torch.int64, device=q.device, shape=(NK,))
    check_tensor("exclude_index", exclude_index, ndim=1, dtype=torch.int64, device=q.device, shape=(B,))
    return B, NK, D


def cap_contrastive_stats(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature):
    """Forward statistics per query row, fp32 ``[B]`` each: ``(lse, cnt_u, sum_u, cnt_s, sum_s)``.

    ``cnt_*`` is ``|P_i|``, ``sum_*`` is ``sum_{k in P_i} s_ik``; ``cnt_s``/``sum_s`` are None without labels.
    """
    B, NK, D = _check_inputs(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index)
    inv_tau = _inv_tau(temperature)
    dev = q.device
    has_labels = query_labels is not None
    if B == 0 or NK == 0 or D == 0:
        valid = torch.ones(B, NK, dtype=torch.bool, device=dev)
        rows = (exclude_index >= 0).nonzero().flatten()
        valid[rows, exclude_index[rows]] = False
        n_valid = valid.sum(1).float()
        lse = torch.where(n_valid > 0, torch.log(n_valid.clamp(min=1)), torch.full_like(n_valid, float("-inf")))
        cnt_u = ((query_ids[:, None] == key_ids[None, :]) & valid).sum(1).float()
        cnt_s = ((query_labels[:, None] == key_labels[None, :]) & valid).sum(1).float() if has_labels else None
        return lse, cnt_u, torch.zeros_like(cnt_u), cnt_s, (torch.zeros_like(cnt_u) if has_labels else None)
    cfg = contrastive_config("fwd", dev, B, NK, D)
    meta, options = contrastive_meta("fwd", cfg, q.dtype, has_labels)
    stats = torch.empty((6, cfg["SPLITS"], B), dtype=torch.float32, device=dev)
    with launch_guard(q):
        _cap_fwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]), cfg["SPLITS"])](
            q, k, query_ids, key_ids, query_labels if has_labels else query_ids,
            key_labels if has_labels else key_ids, exclude_index, stats,
            inv_tau, B, NK, D, cfg["SPLITS"], cfg["KEYS_PER_SPLIT"], **meta, **options)
    m2, l = stats[0], stats[1]
    m = m2.max(0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = (l * torch.exp2(m2 - m_safe)).sum(0)  # empty splits: l = 0, m2 = -inf -> 0
    lse = torch.where(total > 0, (m_safe + torch.log2(total.clamp(min=1e-30))) / _LOG2E,
                      torch.full_like(total, float("-inf")))
    sums = stats[2:].sum(1)
    return lse, sums[0], sums[1], (sums[2] if has_labels else None), (sums[3] if has_labels else None)


def _loss_terms(lse, cnt, ssum, normalization):
    """Loss (0-dim fp32) and per-row ``(w_i, h_i)`` and the global factor ``c`` (all on device)."""
    has = cnt > 0
    w = torch.where(has, 1.0 / cnt.clamp(min=1.0), torch.zeros_like(cnt))
    per_row = torch.where(has, (ssum - cnt * torch.where(has, lse, torch.zeros_like(lse))) * w,
                          torch.zeros_like(cnt))
    denom = cnt.sum() if normalization == "official" else has.float().sum()
    c = -1.0 / denom.clamp(min=1.0)
    return c * per_row.sum(), w, has.float(), c


def _coefficients(f_u, f_s, w_u, h_u, w_s, h_s):
    """Normalised per-row coefficients ``[3, B]`` and the output scale for ``f_u dLu/ds + f_s dLs/ds``."""
    z = torch.maximum(f_u.abs(), f_s.abs())
    z_safe = torch.where(z > 0, z, torch.ones_like(z))
    gu, gs = f_u / z_safe, f_s / z_safe
    a_u = gu * w_u
    beta = gu * h_u
    if w_s is not None:
        a_s = gs * w_s
        beta = beta + gs * h_s
    else:
        a_s = torch.zeros_like(a_u)
    return torch.stack([a_u, a_s, beta]).contiguous(), z


def _launch_dq(q, k, ids, excl, inv_tau, lse, coef, num_out):
    """Per-output fp32 ``sum_k g_ik k_k`` as ``num_out`` separate ``[B, D]`` tensors (split partials summed)."""
    query_ids, key_ids, query_labels, key_labels = ids
    has_labels = query_labels is not None
    B, D = q.shape
    NK = k.shape[0]
    cfg = contrastive_config("dq", q.device, B, NK, D)
    meta, options = contrastive_meta("dq", cfg, q.dtype, has_labels, num_out)
    ws = torch.empty((num_out, cfg["SPLITS"], B, D), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(D, cfg["BLOCK_DO"]), cfg["SPLITS"])
    with launch_guard(q):
        _cap_bwd_dq_kernel[grid](
            q, k, query_ids, key_ids, query_labels if has_labels else query_ids,
            key_labels if has_labels else key_ids, excl, lse, coef, ws,
            inv_tau, B, NK, D, cfg["SPLITS"], cfg["KEYS_PER_SPLIT"], **meta, **options)
    return [ws[i].sum(0) for i in range(num_out)]  # fixed-order sum: deterministic, fresh tensors


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature: float,
                    normalization: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor,
                                                 Optional[torch.Tensor]]:
    """The backend primitive of design.md: ``(loss_u, loss_s | None, grad_q_u, grad_q_s | None)``.

    q: (B, D), k: (K, D) (same dtype, L2-normalised by the caller), ids/labels int64, exclude_index
    int64 (B,) with -1 for none. Keys are constants. Losses are fp32 0-dim, grads in q's dtype; the
    two gradients are separate tensors (custom ops reject outputs that alias each other).
    """
    check_normalization(normalization)
    q, k = q.contiguous(), k.contiguous()
    lse, cnt_u, sum_u, cnt_s, sum_s = cap_contrastive_stats(q, k, query_ids, key_ids, query_labels, key_labels,
                                                            exclude_index, temperature)
    inv_tau = _inv_tau(temperature)
    loss_u, w_u, h_u, c_u = _loss_terms(lse, cnt_u, sum_u, normalization)
    coefs, scales = _coefficients(c_u, torch.zeros_like(c_u), w_u, h_u, None, None)
    coefs, scales = [coefs], [scales]
    loss_s = None
    if query_labels is not None:
        loss_s, w_s, h_s, c_s = _loss_terms(lse, cnt_s, sum_s, normalization)
        coef, scale = _coefficients(torch.zeros_like(c_s), c_s, w_u, h_u, w_s, h_s)
        coefs.append(coef)
        scales.append(scale)
    B, D = q.shape
    if B == 0 or k.shape[0] == 0 or D == 0:
        grads = [torch.zeros_like(q) for _ in coefs]
    else:
        sums = _launch_dq(q, k, (query_ids, key_ids, query_labels, key_labels), exclude_index, inv_tau, lse,
                          torch.cat(coefs).contiguous(), len(coefs))
        grads = [(g * (scale * inv_tau)).to(q.dtype) for g, scale in zip(sums, scales)]
    return loss_u, loss_s, grads[0], (grads[1] if query_labels is not None else None)
