"""Fused contrastive losses (CAP, InfoNCE/CLIP, SupCon) with FlashAttention-style tiling.

CAP loss, exactly as in docs/design.md: ``s_ik = q_i . k_k / tau``; key ``e_i = exclude_index[i]``
(if >= 0) is removed from the softmax and from the positives; ``lse_i = logsumexp_{k != e_i} s_ik``;
``l_ik = s_ik - lse_i``; ``P^u_i = {k != e_i : key_ids[k] == query_ids[i]}``,
``P^s_i = {k != e_i : key_labels[k] == query_labels[i]}``.

* ``official``: ``L = - sum_i (1/|P_i|) sum_{k in P_i} l_ik / sum_i |P_i|`` (0 if no positive at all)
* ``supcon``:   ``L = - (1/|A|) sum_{i in A} (1/|P_i|) sum_{k in P_i} l_ik``, ``A = {i : |P_i| > 0}``

How it is computed (no ``B x K`` tensor is ever formed; extra memory is O(B) per statistic):

* forward kernel, one program per block of query rows: loop over key tiles, ``S = Q K^T / tau`` with
  fp32 accumulation, online max / sum (base-2 exponentials) for ``lse_i``; positives are decided on
  the fly from the id / label vectors, and per row it accumulates ``|P_i|`` and ``sum_{k in P_i} s_ik``
  for both positive sets. Then ``sum_{k in P_i} l_ik = sum_s_i - |P_i| lse_i`` (O(B) torch ops).
* backward recomputes the S tiles: ``dL/ds_ik = c (w_i [k in P_i] - h_i p_ik)`` with ``p = softmax``,
  ``w_i = 1/|P_i|`` (0 without positives), ``h_i = [|P_i| > 0]`` and ``c = -1/denominator``.
  ``dq_i = (1/tau) sum_k dL/ds_ik k_k`` (grid over query tiles x D-chunks) and optionally
  ``dk_k = (1/tau) sum_i dL/ds_ik q_i`` (grid over key tiles x D-chunks). The per-row coefficients
  are normalised to magnitude <= 1 before the kernel and the global factor is applied after the
  fp32 accumulation, so fp16 tiles of ``dL/ds`` do not underflow.
* ``1/tau`` is read from a device scalar: a learnable temperature needs no host sync and gets a
  gradient (``dL/dtau = -(1/tau) sum_ik dL/ds_ik s_ik``, summed from per-row partials).

For D larger than one output chunk the backward recomputes S once per D-chunk (see docs/triton.md:
a cost to measure on GPU).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check_device_usable, check_tensor, dot_flags, interpreting

__all__ = ["cap_contrastive_stats", "cap_contrastive", "cap_contrastive_loss", "clip_loss", "supcon_loss",
           "CapContrastiveFunction"]

_NORMALIZATIONS = ("official", "supcon")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


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
    q_ptr, k_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, excl_ptr, inv_tau_ptr,
    lse_ptr, cnt_u_ptr, sum_u_ptr, cnt_s_ptr, sum_s_ptr,
    B, NK, D,
    HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_in = offs_b < B
    inv_tau = tl.load(inv_tau_ptr)
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
    for n0 in range(0, NK, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_in = offs_n < NK
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

    lse = tl.where(l > 0, (m2 + tl.log2(tl.maximum(l, 1e-30))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + offs_b, lse, mask=b_in)
    tl.store(cnt_u_ptr + offs_b, cnt_u, mask=b_in)
    tl.store(sum_u_ptr + offs_b, sum_u, mask=b_in)
    if HAS_LABELS:
        tl.store(cnt_s_ptr + offs_b, cnt_s, mask=b_in)
        tl.store(sum_s_ptr + offs_b, sum_s, mask=b_in)


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
    q_ptr, k_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, excl_ptr, inv_tau_ptr, lse_ptr,
    coef_ptr,  # fp32 [NUM_OUT, 3, B]: a_u, a_s, beta
    out_scale_ptr,  # fp32 [NUM_OUT]
    dq_ptr,  # [NUM_OUT, B, D]
    gs_ptr,  # fp32 [B]: out_scale[0] * sum_k g_ik s_ik (output 0), for the temperature gradient
    B, NK, D,
    NUM_OUT: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_in = offs_b < B
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_in = offs_do < D
    inv_tau = tl.load(inv_tau_ptr)
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
    gs = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if NUM_OUT == 2:
        a_u1 = tl.load(coef_ptr + 3 * B + offs_b, mask=b_in, other=0.0)
        a_s1 = tl.load(coef_ptr + 4 * B + offs_b, mask=b_in, other=0.0)
        be1 = tl.load(coef_ptr + 5 * B + offs_b, mask=b_in, other=0.0)
        acc1 = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)

    for n0 in range(0, NK, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_in = offs_n < NK
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
        gs += tl.sum(g0 * tl.where(valid, s, 0.0), axis=1)
        acc0 = tl.dot(g0.to(kt.dtype), kt, acc0, input_precision=IN_PREC)
        if NUM_OUT == 2:
            g1 = _grad_tile(s, valid, lse, qid, kid, qlab, klab, a_u1, a_s1, be1, HAS_LABELS)
            acc1 = tl.dot(g1.to(kt.dtype), kt, acc1, input_precision=IN_PREC)

    sc0 = tl.load(out_scale_ptr)
    out_mask = b_in[:, None] & do_in[None, :]
    out_offs = offs_b[:, None] * D + offs_do[None, :]
    tl.store(dq_ptr + out_offs, (acc0 * (sc0 * inv_tau)).to(dq_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gs_ptr + offs_b, gs * sc0, mask=b_in & ((offs_b * 0 + pid_d) == 0))  # one D-chunk writes
    if NUM_OUT == 2:
        sc1 = tl.load(out_scale_ptr + 1)
        tl.store(dq_ptr + B * D + out_offs, (acc1 * (sc1 * inv_tau)).to(dq_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _cap_bwd_dk_kernel(
    q_ptr, k_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, excl_ptr, inv_tau_ptr, lse_ptr,
    coef_ptr, out_scale_ptr, dk_ptr,
    B, NK, D,
    HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_in = offs_n < NK
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_in = offs_do < D
    inv_tau = tl.load(inv_tau_ptr)
    kid = tl.load(kid_ptr + offs_n, mask=n_in, other=0)
    klab = kid
    if HAS_LABELS:
        klab = tl.load(klab_ptr + offs_n, mask=n_in, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        b_in = offs_b < B
        s = _scores_tile(q_ptr, k_ptr, offs_b, offs_n, b_in, n_in, D, BLOCK_B, BLOCK_N, BLOCK_D, UPCAST,
                         IN_PREC) * inv_tau
        qid = tl.load(qid_ptr + offs_b, mask=b_in, other=0)
        excl = tl.load(excl_ptr + offs_b, mask=b_in, other=-1)
        lse = tl.load(lse_ptr + offs_b, mask=b_in, other=0.0)
        qlab = qid
        if HAS_LABELS:
            qlab = tl.load(qlab_ptr + offs_b, mask=b_in, other=0)
        a_u = tl.load(coef_ptr + offs_b, mask=b_in, other=0.0)
        a_s = tl.load(coef_ptr + B + offs_b, mask=b_in, other=0.0)
        be = tl.load(coef_ptr + 2 * B + offs_b, mask=b_in, other=0.0)
        valid = b_in[:, None] & n_in[None, :] & (offs_n[None, :] != excl[:, None])
        g = _grad_tile(s, valid, lse, qid, kid, qlab, klab, a_u, a_s, be, HAS_LABELS)
        qt = tl.load(q_ptr + offs_b[:, None] * D + offs_do[None, :], mask=b_in[:, None] & do_in[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
        acc = tl.dot(tl.trans(g.to(qt.dtype)), qt, acc, input_precision=IN_PREC)
    sc = tl.load(out_scale_ptr)
    tl.store(dk_ptr + offs_n[:, None] * D + offs_do[None, :], (acc * (sc * inv_tau)).to(dk_ptr.dtype.element_ty),
             mask=n_in[:, None] & do_in[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _config(device: torch.device, d: int, num_out: int = 1):
    # H100 defaults (unmeasured): 128 query rows x 64 keys per S tile, 64-wide feature steps,
    # dq/dk output chunks of up to 128 features (64 when two fp32 accumulators must fit registers).
    if interpreting() or device.type != "cuda":
        return dict(BLOCK_B=16, BLOCK_N=16, BLOCK_D=32, BLOCK_DO=32, num_warps=1, num_stages=1)
    do = min(128 if num_out == 1 else 64, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_B=128, BLOCK_N=64, BLOCK_D=64, BLOCK_DO=do, num_warps=8, num_stages=2)


def _inv_tau(temperature, device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, ndim=0, device=device, contiguous=False)
        return (1.0 / temperature.detach().float()).reshape(())
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature: expected a positive float, got {temperature}")
    return torch.full((), 1.0 / t, dtype=torch.float32, device=device)


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
    if exclude_index is not None:
        check_tensor("exclude_index", exclude_index, ndim=1, dtype=torch.int64, device=q.device, shape=(B,))
    return B, NK, D


def cap_contrastive_stats(q, k, query_ids, key_ids, query_labels=None, key_labels=None, exclude_index=None,
                          temperature=0.1):
    """Forward statistics per query row, fp32 ``[B]`` each: ``(lse, cnt_u, sum_u, cnt_s, sum_s)``.

    ``cnt_*`` is ``|P_i|``, ``sum_*`` is ``sum_{k in P_i} s_ik``; ``cnt_s``/``sum_s`` are None without labels.
    """
    B, NK, D = _check_inputs(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index)
    dev = q.device
    has_labels = query_labels is not None
    if exclude_index is None:
        exclude_index = torch.full((B,), -1, dtype=torch.int64, device=dev)
    inv_tau = _inv_tau(temperature, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    lse = torch.full((B,), float("-inf"), **f32)
    cnt_u, sum_u = torch.zeros(B, **f32), torch.zeros(B, **f32)
    cnt_s, sum_s = (torch.zeros(B, **f32), torch.zeros(B, **f32)) if has_labels else (None, None)
    if B > 0 and NK > 0 and D > 0:
        cfg = _config(dev, D)
        _cap_fwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
            q, k, query_ids, key_ids, query_labels if has_labels else query_ids,
            key_labels if has_labels else key_ids, exclude_index, inv_tau,
            lse, cnt_u, sum_u, cnt_s if has_labels else cnt_u, sum_s if has_labels else sum_u,
            B, NK, D, HAS_LABELS=has_labels, BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=cfg["BLOCK_D"], **dot_flags(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif B > 0 and NK > 0:  # D == 0: every score is 0
        valid = torch.ones(B, NK, dtype=torch.bool, device=dev)
        valid[exclude_index >= 0, exclude_index[exclude_index >= 0]] = False
        lse = torch.log(valid.sum(1).float())
        cnt_u = ((query_ids[:, None] == key_ids[None, :]) & valid).sum(1).float()
        if has_labels:
            cnt_s = ((query_labels[:, None] == key_labels[None, :]) & valid).sum(1).float()
    return lse, cnt_u, sum_u, cnt_s, sum_s


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
    return torch.stack([a_u, a_s, beta]).contiguous(), z.reshape(1)


def _launch_dq(q, k, ids, excl, inv_tau, lse, coef, out_scale, num_out):
    query_ids, key_ids, query_labels, key_labels = ids
    has_labels = query_labels is not None
    B, D = q.shape
    NK = k.shape[0]
    dq = torch.zeros((num_out, B, D), dtype=q.dtype, device=q.device)
    gs = torch.zeros(B, dtype=torch.float32, device=q.device)
    if B == 0 or NK == 0 or D == 0:
        return dq, gs
    cfg = _config(q.device, D, num_out)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    _cap_bwd_dq_kernel[grid](
        q, k, query_ids, key_ids, query_labels if has_labels else query_ids, key_labels if has_labels else key_ids,
        excl, inv_tau, lse, coef, out_scale, dq, gs, B, NK, D,
        NUM_OUT=num_out, HAS_LABELS=has_labels, BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=cfg["BLOCK_DO"], **dot_flags(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, gs


def _launch_dk(q, k, ids, excl, inv_tau, lse, coef, out_scale):
    query_ids, key_ids, query_labels, key_labels = ids
    has_labels = query_labels is not None
    B, D = q.shape
    NK = k.shape[0]
    dk = torch.zeros((NK, D), dtype=k.dtype, device=k.device)
    if B == 0 or NK == 0 or D == 0:
        return dk
    cfg = _config(q.device, D)
    grid = (triton.cdiv(NK, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    _cap_bwd_dk_kernel[grid](
        q, k, query_ids, key_ids, query_labels if has_labels else query_ids, key_labels if has_labels else key_ids,
        excl, inv_tau, lse, coef, out_scale, dk, B, NK, D,
        HAS_LABELS=has_labels, BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_DO=cfg["BLOCK_DO"], **dot_flags(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dk


def _check_norm(normalization):
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {_NORMALIZATIONS}, got {normalization!r}")


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature: float,
                    normalization: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor,
                                                 Optional[torch.Tensor]]:
    """The backend primitive of design.md: ``(loss_u, loss_s | None, grad_q_u, grad_q_s | None)``.

    q: (B, D), k: (K, D) (same dtype, L2-normalised by the caller), ids/labels int64, exclude_index
    int64 (B,) with -1 for none. Keys are constants. Losses are fp32 0-dim, grads in q's dtype.
    One forward pass and one fused backward pass that produces both gradients.
    """
    _check_norm(normalization)
    q, k = q.contiguous(), k.contiguous()
    B = q.shape[0] if q.dim() == 2 else 0
    if exclude_index is None and q.dim() == 2:
        exclude_index = torch.full((B,), -1, dtype=torch.int64, device=q.device)
    lse, cnt_u, sum_u, cnt_s, sum_s = cap_contrastive_stats(q, k, query_ids, key_ids, query_labels, key_labels,
                                                            exclude_index, temperature)
    loss_u, w_u, h_u, c_u = _loss_terms(lse, cnt_u, sum_u, normalization)
    has_labels = query_labels is not None
    coefs, scales = [], []
    coef, scale = _coefficients(c_u, torch.zeros_like(c_u), w_u, h_u, None, None)
    coefs.append(coef)
    scales.append(scale)
    loss_s = None
    if has_labels:
        loss_s, w_s, h_s, c_s = _loss_terms(lse, cnt_s, sum_s, normalization)
        coef, scale = _coefficients(torch.zeros_like(c_s), c_s, w_u, h_u, w_s, h_s)
        coefs.append(coef)
        scales.append(scale)
    inv_tau = _inv_tau(temperature, q.device)
    dq, _ = _launch_dq(q, k, (query_ids, key_ids, query_labels, key_labels), exclude_index, inv_tau, lse,
                       torch.cat(coefs).contiguous(), torch.cat(scales).contiguous(), len(coefs))
    return loss_u, loss_s, dq[0], (dq[1] if has_labels else None)


class CapContrastiveFunction(torch.autograd.Function):
    """Autograd wrapper: ``(loss_u, loss_s)`` with gradients for q, k and a tensor temperature.

    ``loss_s`` is a 0 tensor when no labels are given (the functional wrapper returns None then).
    """

    @staticmethod
    def forward(ctx, q, k, temperature, query_ids, key_ids, query_labels, key_labels, exclude_index,
                normalization):
        q, k = q.contiguous(), k.contiguous()
        B = q.shape[0]
        if exclude_index is None:
            exclude_index = torch.full((B,), -1, dtype=torch.int64, device=q.device)
        stats = cap_contrastive_stats(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature)
        lse, cnt_u, sum_u, cnt_s, sum_s = stats
        loss_u, w_u, h_u, c_u = _loss_terms(lse, cnt_u, sum_u, normalization)
        if query_labels is not None:
            loss_s, w_s, h_s, c_s = _loss_terms(lse, cnt_s, sum_s, normalization)
        else:
            loss_s, w_s, h_s, c_s = torch.zeros_like(loss_u), None, None, torch.zeros_like(c_u)
        inv_tau = _inv_tau(temperature, q.device)
        ctx.save_for_backward(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, lse, inv_tau,
                              w_u, h_u, c_u, w_s, h_s, c_s)
        ctx.temperature_is_tensor = isinstance(temperature, torch.Tensor)
        return loss_u, loss_s

    @staticmethod
    def backward(ctx, go_u, go_s):
        (q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, lse, inv_tau,
         w_u, h_u, c_u, w_s, h_s, c_s) = ctx.saved_tensors
        go_u = torch.zeros_like(c_u) if go_u is None else go_u.float()
        go_s = torch.zeros_like(c_s) if go_s is None else go_s.float()
        coef, scale = _coefficients(go_u * c_u, go_s * c_s, w_u, h_u, w_s, h_s)
        ids = (query_ids, key_ids, query_labels, key_labels)
        need_q, need_k, need_t = ctx.needs_input_grad[:3]
        dq = dk = dt = None
        if need_q or need_t:
            dq_all, gs = _launch_dq(q, k, ids, exclude_index, inv_tau, lse, coef, scale, 1)
            dq = dq_all[0] if need_q else None
            if need_t:  # dL/dtau = -(1/tau) sum_ik dL/ds_ik s_ik
                dt = -(gs.sum() * inv_tau)
        if need_k:
            dk = _launch_dk(q, k, ids, exclude_index, inv_tau, lse, coef, scale)
        return dq, dk, dt, None, None, None, None, None, None


def cap_contrastive_loss(q, k, query_ids, key_ids, query_labels=None, key_labels=None, exclude_index=None,
                         temperature=0.1, normalization: str = "official"):
    """Differentiable CAP losses ``(loss_u, loss_s | None)`` (fp32 0-dim), fused, O((B+K) D) memory.

    q: (B, D), k: (K, D); gradients flow to q, to k when it requires grad, and to ``temperature``
    when it is a 0-dim tensor that requires grad.
    """
    _check_norm(normalization)
    _check_inputs(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index)
    loss_u, loss_s = CapContrastiveFunction.apply(q, k, temperature, query_ids, key_ids, query_labels, key_labels,
                                                  exclude_index, normalization)
    return loss_u, (loss_s if query_labels is not None else None)


def clip_loss(a: torch.Tensor, b: torch.Tensor, temperature=0.07) -> torch.Tensor:
    """Symmetric InfoNCE / CLIP over one batch: ``(CE(S, diag) + CE(S^T, diag)) / 2``, ``S = a b^T / tau``.

    a, b: (B, D). Gradients flow to both (and to a tensor temperature).
    """
    check_tensor("a", a, ndim=2, dtypes=_FLOATS, contiguous=False)
    check_tensor("b", b, ndim=2, dtypes=_FLOATS, contiguous=False)
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} (same as a), got {tuple(b.shape)}")
    ids = torch.arange(a.shape[0], device=a.device)
    rows, _ = cap_contrastive_loss(a, b, ids, ids, temperature=temperature, normalization="supcon")
    cols, _ = cap_contrastive_loss(b, a, ids, ids, temperature=temperature, normalization="supcon")
    return 0.5 * (rows + cols)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature=0.1) -> torch.Tensor:
    """SupCon (Khosla et al., "L_out") over one batch: anchors are all rows, keys all other rows.

    ``L = -(1/|A|) sum_{i in A} (1/|P_i|) sum_{p in P_i} log softmax_{a != i}(f_i . f_a / tau)_p``,
    ``P_i = {p != i : labels[p] == labels[i]}``, ``A`` the rows with a positive.
    features: (B, D) L2-normalised; labels: int64 (B,).
    """
    check_tensor("features", features, ndim=2, dtypes=_FLOATS, contiguous=False)
    B = features.shape[0]
    check_tensor("labels", labels, ndim=1, dtype=torch.int64, device=features.device, shape=(B,))
    self_index = torch.arange(B, device=features.device)
    loss, _ = cap_contrastive_loss(features, features, labels, labels, exclude_index=self_index,
                                   temperature=temperature, normalization="supcon")
    return loss
