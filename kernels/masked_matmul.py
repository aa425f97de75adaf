"""Masked GEMMs for unstructured masks: the mask is applied on operand load, never materialised.

``W[N, K]`` is a dense weight and ``M[N, K]`` a 0/1 mask stored as a packed bitmask ``bits``:

* bit layout: row-major over ``N``; each row of ``K`` mask bits is cut into words of ``WB`` bits
  (``WB = 8`` for ``torch.uint8`` words, ``WB = 32`` for ``torch.int32`` words); word ``w`` of row
  ``n`` holds columns ``k = w*WB + j`` for ``j in [0, WB)``, **bit ``j`` = ``(word >> j) & 1``**
  (least significant bit first). ``bits`` has shape ``[N, ceil(K / WB)]``; bits past ``K`` are 0.
  For int32 words bit 31 is the sign bit (words are plain bit patterns).
* memory: ``N*K/8`` bytes, 1/16 of a bf16 weight.

Products (fp32 accumulation, no ``W*M`` temporary):

* forward  ``y = x @ (W*M)^T + bias``      (mask applied to the W tile after it is loaded)
* dX       ``grad_x = grad_y @ (W*M)``
* dW       ``grad_w = (grad_y^T @ x) * M``  (mask applied in the epilogue; masked entries exactly 0)

Same tiling as a dense GEMM, so the goal is parity with cuBLAS (<= 1.05x), not a speedup: a random
mask at 90-97% sparsity leaves almost no empty tiles for tensor cores to skip.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_device_usable, check_tensor, dot_flags, interpreting

__all__ = ["pack_mask", "unpack_mask", "masked_matmul_forward", "masked_matmul_grad_input",
           "masked_matmul_grad_weight"]

_WORD_BITS = {torch.uint8: 8, torch.int32: 32}


def pack_mask(mask: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Pack a bool ``[N, K]`` mask into ``[N, ceil(K/WB)]`` words (layout in the module docstring)."""
    check_tensor("mask", mask, ndim=2, dtype=torch.bool, contiguous=False)
    if dtype not in _WORD_BITS:
        raise TypeError(f"dtype: expected torch.uint8 or torch.int32, got {dtype}")
    wb = _WORD_BITS[dtype]
    n, k = mask.shape
    words = triton.cdiv(k, wb) if k else 0
    padded = torch.zeros((n, words * wb), dtype=torch.int64, device=mask.device)
    padded[:, :k] = mask.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(wb, dtype=torch.int64, device=mask.device),
                                       torch.arange(wb, device=mask.device))
    packed = (padded.view(n, words, wb) * weights).sum(-1)
    if dtype == torch.int32:
        packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(dtype).contiguous()


def unpack_mask(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: bool ``[N, k]``."""
    if bits.dtype not in _WORD_BITS:
        raise TypeError(f"bits: expected dtype torch.uint8 or torch.int32, got {bits.dtype}")
    wb = _WORD_BITS[bits.dtype]
    shifts = torch.arange(wb, device=bits.device)
    expanded = (bits.to(torch.int64)[..., None] >> shifts) & 1
    return expanded.reshape(bits.shape[0], -1)[:, :k].bool()


@triton.jit
def _mask_tile(bits_ptr, offs_n, offs_k, valid, WORDS, WB: tl.constexpr):
    word = tl.load(bits_ptr + offs_n[:, None] * WORDS + (offs_k // WB)[None, :], mask=valid, other=0)
    return ((word.to(tl.int32) >> (offs_k % WB)[None, :]) & 1) != 0


@triton.jit
def _masked_fwd_kernel(
    x_ptr, w_ptr, bits_ptr, b_ptr, y_ptr,
    T, N, K, WORDS,
    WB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    t_in = offs_t < T
    n_in = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_in = offs_k < K
        x = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=t_in[:, None] & k_in[None, :], other=0.0)
        wv = n_in[:, None] & k_in[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=wv, other=0.0)
        w = tl.where(_mask_tile(bits_ptr, offs_n, offs_k, wv, WORDS, WB), w, 0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=IN_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_in[:, None] & n_in[None, :])


@triton.jit
def _masked_dx_kernel(
    dy_ptr, w_ptr, bits_ptr, dx_ptr,
    T, N, K, WORDS,
    WB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    t_in = offs_t < T
    k_in = offs_k < K
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_in = offs_n < N
        dy = tl.load(dy_ptr + offs_t[:, None] * N + offs_n[None, :], mask=t_in[:, None] & n_in[None, :], other=0.0)
        wv = n_in[:, None] & k_in[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=wv, other=0.0)
        w = tl.where(_mask_tile(bits_ptr, offs_n, offs_k, wv, WORDS, WB), w, 0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=IN_PREC)
    tl.store(dx_ptr + offs_t[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=t_in[:, None] & k_in[None, :])


@triton.jit
def _masked_dw_kernel(
    dy_ptr, x_ptr, bits_ptr, dw_ptr,
    T, N, K, WORDS,
    WB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_in = offs_n < N
    k_in = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_in = offs_t < T
        dy = tl.load(dy_ptr + offs_t[:, None] * N + offs_n[None, :], mask=t_in[:, None] & n_in[None, :], other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=t_in[:, None] & k_in[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=IN_PREC)
    valid = n_in[:, None] & k_in[None, :]
    acc = tl.where(_mask_tile(bits_ptr, offs_n, offs_k, valid, WORDS, WB), acc, 0.0)  # epilogue mask
    tl.store(dw_ptr + offs_n[:, None] * K + offs_k[None, :], acc.to(dw_ptr.dtype.element_ty), mask=valid)


def _config(device: torch.device):
    # H100 defaults (unmeasured): 128x128 output tile, K step 64, 8 warps, 3 stages.
    if interpreting() or device.type != "cuda":
        return dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
    return dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _check_bits(bits: torch.Tensor, n: int, k: int, device) -> int:
    check_tensor("bits", bits, ndim=2, dtypes=tuple(_WORD_BITS), device=device)
    wb = _WORD_BITS[bits.dtype]
    expected = (n, triton.cdiv(k, wb))
    if tuple(bits.shape) != expected:
        raise ValueError(f"bits: expected shape {expected} for a ({n}, {k}) weight with {wb}-bit words, "
                         f"got {tuple(bits.shape)}")
    return wb


def masked_matmul_forward(x: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y[T, N] = x @ (W * M)^T + bias`` with M unpacked from ``bits`` on load.

    x: (T, K); weight: (N, K); bits: (N, ceil(K/WB)) uint8 or int32; bias: (N,) or None.
    """
    check_tensor("x", x, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_device_usable("x", x)
    check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x: expected shape (T, {k}) to match weight ({n}, {k}), got {tuple(x.shape)}")
    wb = _check_bits(bits, n, k, x.device)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtype=x.dtype, device=x.device, shape=(n,))
    t = x.shape[0]
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(t, n))
    cfg = _config(x.device)
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _masked_fwd_kernel[grid](x, weight, bits, bias if bias is not None else x, y, t, n, k, bits.shape[1],
                             WB=wb, HAS_BIAS=bias is not None, **dot_flags(x.dtype), **cfg)
    return y


def masked_matmul_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``grad_x[T, K] = grad_y @ (W * M)``. grad_y: (T, N); weight: (N, K); bits as in the forward."""
    check_tensor("grad_y", grad_y, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_device_usable("grad_y", grad_y)
    check_tensor("weight", weight, ndim=2, dtype=grad_y.dtype, device=grad_y.device)
    n, k = weight.shape
    if grad_y.shape[1] != n:
        raise ValueError(f"grad_y: expected shape (T, {n}) to match weight ({n}, {k}), got {tuple(grad_y.shape)}")
    wb = _check_bits(bits, n, k, grad_y.device)
    t = grad_y.shape[0]
    dx = torch.zeros((t, k), dtype=grad_y.dtype, device=grad_y.device)
    if t == 0 or k == 0 or n == 0:
        return dx
    cfg = _config(grad_y.device)
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _masked_dx_kernel[grid](grad_y, weight, bits, dx, t, n, k, bits.shape[1], WB=wb,
                            **dot_flags(grad_y.dtype), **cfg)
    return dx


def masked_matmul_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``grad_w[N, K] = (grad_y^T @ x) * M``; entries where M is 0 are exactly 0.

    grad_y: (T, N); x: (T, K); bits: (N, ceil(K/WB)).
    """
    check_tensor("grad_y", grad_y, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_device_usable("grad_y", grad_y)
    check_tensor("x", x, ndim=2, dtype=grad_y.dtype, device=grad_y.device)
    t, n = grad_y.shape
    if x.shape[0] != t:
        raise ValueError(f"x: expected {t} rows (same T as grad_y), got shape {tuple(x.shape)}")
    k = x.shape[1]
    wb = _check_bits(bits, n, k, grad_y.device)
    dw = torch.zeros((n, k), dtype=grad_y.dtype, device=grad_y.device)
    if t == 0 or n == 0 or k == 0:
        return dw
    cfg = _config(grad_y.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _masked_dw_kernel[grid](grad_y, x, bits, dw, t, n, k, bits.shape[1], WB=wb, **dot_flags(grad_y.dtype), **cfg)
    return dw
