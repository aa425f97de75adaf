"""Block-sparse linear layer kernels (weight ``W[N, K]`` block-sparse, activations dense).

Math (design.md, "Backend primitives"), blocks of ``bm x bk``, ``R = N // bm``, ``C = K // bk``:

* forward  ``y[:, rows(r)] = sum_{c kept in r} x[:, cols(c)] @ W[rows(r), cols(c)]^T (+ bias)``
* dX       ``grad_x[:, cols(c)] = sum_{r kept in c} grad_y[:, rows(r)] @ W[rows(r), cols(c)]``
* dW       ``grad_w[rows(r), cols(c)] = grad_y[:, rows(r)]^T @ x[:, cols(c)]`` on kept blocks, 0 elsewhere

Every kernel reads the kept blocks straight out of the dense ``W`` at block coordinates taken from
the device-side layout metadata (``capsparse/layout.py``): no packed copy, no transposed copy, no
host sync. Accumulation is fp32 for every input dtype.

Fusion options (constexpr, for BERT's FFN2 whose input is ``gelu(h)``):

* ``gelu_input=True`` (forward, dW): the kernel loads the pre-activation ``h`` and applies the exact
  GELU on load, so ``gelu(h)`` is never written to memory.
* ``gelu_preact=h`` (dX): the epilogue multiplies by ``gelu'(h)`` and returns ``dL/dh`` directly.
* bias is added in the forward epilogue.

dW uses split-K over tokens: program ``(b, s)`` computes the partial product of kept block ``b``
over token chunk ``s``. The default reduction is deterministic (partials go to an fp32 workspace
``[splits, capacity, bm, bk]`` and a second kernel sums them in a fixed order); ``deterministic=False``
uses fp32 atomics instead (no workspace, run-to-run bit differences).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    SUPPORTED_DTYPES,
    check_block,
    check_device_usable,
    check_tensor,
    dot_flags,
    gelu_f32,
    gelu_grad_f32,
    get_config,
    launch_guard,
)

__all__ = ["bsl_forward", "bsl_grad_input", "bsl_grad_weight", "launch_meta"]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bsl_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr_ptr, row_cols_ptr,
    # sizes and strides (all tensors are row-major contiguous)
    T, N, K,
    # meta-parameters
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU_X: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    r = tl.program_id(1)
    # 64-bit scalar bases, 32-bit offsets inside the tile: 64-bit per-element offsets cost two
    # registers per loaded element (ptxas spilled at 128 x 64 tiles)
    t0 = pid_t.to(tl.int64) * BLOCK_T
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BM)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = (t0 + offs_t) < T
    x_base = x_ptr + t0 * K
    w_base = w_ptr + r.to(tl.int64) * BM * K

    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_T, BM), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(row_cols_ptr + p)
        for kk in tl.static_range(0, BK, BLOCK_K):
            cols = c * BK + kk + offs_k
            x = tl.load(x_base + offs_t[:, None] * K + cols[None, :], mask=t_mask[:, None], other=0.0)
            if GELU_X:
                x = gelu_f32(x.to(tl.float32)).to(x_ptr.dtype.element_ty)
            w = tl.load(w_base + offs_n[:, None] * K + cols[None, :])
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=IN_PREC)

    if HAS_BIAS:
        acc += tl.load(b_ptr + r * BM + offs_n).to(tl.float32)[None, :]
    y_base = y_ptr + t0 * N + r * BM
    tl.store(y_base + offs_t[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_mask[:, None])


@triton.jit
def _bsl_dx_kernel(
    dy_ptr, w_ptr, h_ptr, dx_ptr, col_ptr_ptr, col_rows_ptr,
    T, N, K,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    GELU_GRAD: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    c = tl.program_id(1)
    t0 = pid_t.to(tl.int64) * BLOCK_T  # 64-bit scalar bases, 32-bit tile offsets (as in the forward)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BLOCK_N)
    t_mask = (t0 + offs_t) < T
    dy_base = dy_ptr + t0 * N
    w_base = w_ptr + c * BK

    start = tl.load(col_ptr_ptr + c)
    end = tl.load(col_ptr_ptr + c + 1)
    acc = tl.zeros((BLOCK_T, BK), dtype=tl.float32)
    for p in range(start, end):
        r = tl.load(col_rows_ptr + p)
        for nn in tl.static_range(0, BM, BLOCK_N):
            rows = r * BM + nn + offs_n
            dy = tl.load(dy_base + offs_t[:, None] * N + rows[None, :], mask=t_mask[:, None], other=0.0)
            w = tl.load(w_base + rows.to(tl.int64)[:, None] * K + offs_k[None, :])
            if UPCAST:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=IN_PREC)

    out_offs = t0 * K + c * BK + (offs_t[:, None] * K + offs_k[None, :])
    if GELU_GRAD:
        h = tl.load(h_ptr + out_offs, mask=t_mask[:, None], other=0.0).to(tl.float32)
        acc = acc * gelu_grad_f32(h)
    tl.store(dx_ptr + out_offs, acc.to(dx_ptr.dtype.element_ty), mask=t_mask[:, None])


@triton.jit
def _bsl_dw_kernel(
    dy_ptr, x_ptr, out_ptr, block_rows_ptr, block_cols_ptr, nnz_ptr,
    T, N, K, CAPACITY,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_T: tl.constexpr, TOKENS_PER_SPLIT: tl.constexpr,
    MODE: tl.constexpr,  # 0: store into grad_w, 1: store partial into workspace, 2: atomic add (fp32)
    GELU_X: tl.constexpr, UPCAST: tl.constexpr, IN_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    nnz = tl.load(nnz_ptr)
    # Grid is sized to the capacity; slots past the device-side nnz exit at once (no host sync).
    if pid_b < nnz:
        r = tl.load(block_rows_ptr + pid_b).to(tl.int64)
        c = tl.load(block_cols_ptr + pid_b).to(tl.int64)
        offs_m = tl.arange(0, BM)
        offs_kb = tl.arange(0, BK)
        offs_n = r * BM + offs_m
        offs_k = c * BK + offs_kb
        t_lo = pid_s * TOKENS_PER_SPLIT
        t_hi = tl.minimum(t_lo + TOKENS_PER_SPLIT, T)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            t_mask = offs_t < t_hi
            dy = tl.load(dy_ptr + offs_t[:, None] * N + offs_n[None, :], mask=t_mask[:, None], other=0.0)
            x = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=t_mask[:, None], other=0.0)
            if GELU_X:
                x = gelu_f32(x.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if UPCAST:
                dy = dy.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=IN_PREC)

        if MODE == 0:
            tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], acc.to(out_ptr.dtype.element_ty))
        elif MODE == 1:
            base = (pid_s.to(tl.int64) * CAPACITY + pid_b) * (BM * BK)
            tl.store(out_ptr + base + offs_m[:, None] * BK + offs_kb[None, :], acc)
        else:
            tl.atomic_add(out_ptr + offs_n[:, None] * K + offs_k[None, :], acc)


@triton.jit
def _bsl_dw_reduce_kernel(
    ws_ptr, gw_ptr, block_rows_ptr, block_cols_ptr, nnz_ptr,
    K, CAPACITY, SPLITS,
    BM: tl.constexpr, BK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    nnz = tl.load(nnz_ptr)
    if pid_b < nnz:
        r = tl.load(block_rows_ptr + pid_b).to(tl.int64)
        c = tl.load(block_cols_ptr + pid_b).to(tl.int64)
        offs_m = tl.arange(0, BM)
        offs_kb = tl.arange(0, BK)
        local = offs_m[:, None] * BK + offs_kb[None, :]
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for s in range(0, SPLITS):  # fixed order: deterministic
            base = (s * CAPACITY + pid_b).to(tl.int64) * (BM * BK)
            acc += tl.load(ws_ptr + base + local)
        offs_n = r * BM + offs_m
        offs_k = c * BK + offs_kb
        tl.store(gw_ptr + offs_n[:, None] * K + offs_k[None, :], acc.to(gw_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def launch_meta(op: str, bm: int, bk: int, dtype: torch.dtype, cfg, *, has_bias: bool = False, gelu: bool = False,
                tokens_per_split: Optional[int] = None):
    """``(constexprs, options)`` of the ``op`` kernel ("fwd", "dx", "dw") for a launch config ``cfg``.

    The launchers and the ahead-of-time compile check (tests/test_triton_aot.py) both use it, so the
    check compiles exactly what a GPU launch would.
    """
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    flags = dot_flags(dtype)
    if op == "fwd":
        return dict(BM=bm, BK=bk, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=min(cfg["BLOCK_K"], bk), HAS_BIAS=has_bias,
                    GELU_X=gelu, **flags), options
    if op == "dx":
        return dict(BM=bm, BK=bk, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=min(cfg["BLOCK_K"], bm), GELU_GRAD=gelu,
                    **flags), options
    block_t = cfg["BLOCK_T"]
    tps = int(tokens_per_split or cfg["TOKENS_PER_SPLIT"])
    tps = max(block_t, triton.cdiv(tps, block_t) * block_t)
    return dict(BM=bm, BK=bk, BLOCK_T=block_t, TOKENS_PER_SPLIT=tps, GELU_X=gelu, **flags), options


def _check_weight(weight: torch.Tensor, bm: int, bk: int, device: torch.device):
    check_block("bm", bm)
    check_block("bk", bk)
    check_tensor("weight", weight, ndim=2, dtypes=SUPPORTED_DTYPES, device=device)
    N, K = weight.shape
    if N % bm != 0:
        raise ValueError(f"weight: expected dim 0 (N={N}) to be a multiple of bm={bm}")
    if K % bk != 0:
        raise ValueError(f"weight: expected dim 1 (K={K}) to be a multiple of bk={bk}")
    return N, K, N // bm, K // bk


def _check_index(name: str, t: torch.Tensor, numel: int, device: torch.device) -> None:
    check_tensor(name, t, ndim=1, dtype=torch.int32, device=device, shape=(numel,))


def bsl_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], row_ptr: torch.Tensor,
                row_cols: torch.Tensor, bm: int, bk: int, *, gelu_input: bool = False,
                density: Optional[float] = None) -> torch.Tensor:
    """Block-sparse forward ``y[T, N] = act(x) @ (W * blockmask)^T + bias``.

    x: (T, K); weight: (N, K) dense, only kept blocks are read; bias: (N,) or None;
    row_ptr: int32 (R+1,); row_cols: int32 (R*C,). ``act`` is GELU when ``gelu_input`` else identity.
    ``density`` is an optional host-side hint that only selects the launch config.
    """
    check_tensor("x", x, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_device_usable("x", x)
    N, K, R, C = _check_weight(weight, bm, bk, x.device)
    if x.shape[1] != K:
        raise ValueError(f"x: expected shape (T, {K}) to match weight (N={N}, K={K}), got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (same as x), got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtype=x.dtype, device=x.device, shape=(N,))
    _check_index("row_ptr", row_ptr, R + 1, x.device)
    _check_index("row_cols", row_cols, R * C, x.device)

    T = x.shape[0]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    cfg = get_config("fwd", max(bm, bk), x.device, density, x.dtype)
    meta, options = launch_meta("fwd", bm, bk, x.dtype, cfg, has_bias=bias is not None, gelu=gelu_input)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), R)
    with launch_guard(x):
        _bsl_fwd_kernel[grid](x, weight, bias if bias is not None else x, y, row_ptr, row_cols, T, N, K,
                              **meta, **options)
    return y


def bsl_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, col_ptr: torch.Tensor, col_rows: torch.Tensor,
                   bm: int, bk: int, *, gelu_preact: Optional[torch.Tensor] = None,
                   density: Optional[float] = None) -> torch.Tensor:
    """Block-sparse input gradient ``grad_x[T, K] = grad_y @ (W * blockmask)``, over block-columns.

    grad_y: (T, N); weight: (N, K); col_ptr: int32 (C+1,); col_rows: int32 (R*C,).
    With ``gelu_preact=h`` (T, K) the result is multiplied by ``gelu'(h)`` in the epilogue (the
    gradient with respect to the pre-activation of FFN2's input).
    """
    check_tensor("grad_y", grad_y, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_device_usable("grad_y", grad_y)
    N, K, R, C = _check_weight(weight, bm, bk, grad_y.device)
    if grad_y.shape[1] != N:
        raise ValueError(f"grad_y: expected shape (T, {N}) to match weight (N={N}, K={K}), "
                         f"got {tuple(grad_y.shape)}")
    if weight.dtype != grad_y.dtype:
        raise TypeError(f"weight: expected dtype {grad_y.dtype} (same as grad_y), got {weight.dtype}")
    T = grad_y.shape[0]
    if gelu_preact is not None:
        check_tensor("gelu_preact", gelu_preact, ndim=2, dtype=grad_y.dtype, device=grad_y.device, shape=(T, K))
    _check_index("col_ptr", col_ptr, C + 1, grad_y.device)
    _check_index("col_rows", col_rows, R * C, grad_y.device)

    dx = torch.empty((T, K), dtype=grad_y.dtype, device=grad_y.device)
    if T == 0:
        return dx
    cfg = get_config("dx", max(bm, bk), grad_y.device, density, grad_y.dtype)
    meta, options = launch_meta("dx", bm, bk, grad_y.dtype, cfg, gelu=gelu_preact is not None)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), C)
    with launch_guard(grad_y):
        _bsl_dx_kernel[grid](grad_y, weight, gelu_preact if gelu_preact is not None else grad_y, dx, col_ptr,
                             col_rows, T, N, K, **meta, **options)
    return dx


def bsl_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, block_rows: torch.Tensor, block_cols: torch.Tensor,
                    nnz: torch.Tensor, bm: int, bk: int, *, gelu_input: bool = False, deterministic: bool = True,
                    capacity: Optional[int] = None, tokens_per_split: Optional[int] = None,
                    density: Optional[float] = None) -> torch.Tensor:
    """Weight gradient on kept blocks only: ``grad_w[N, K]``, exactly 0 outside kept blocks.

    grad_y: (T, N); x: (T, K) (pre-activation when ``gelu_input``); block_rows, block_cols: int32
    (R*C,) flat kept-block list; nnz: int64 0-dim device tensor.

    Split-K over tokens with ``tokens_per_split`` tokens per program (config default). ``capacity``
    (default ``R*C``) bounds the number of kept blocks the grid covers; a smaller value shrinks the
    deterministic workspace (``splits * capacity * bm * bk`` fp32). The caller guarantees
    ``nnz <= capacity`` (checked on device with ``torch._assert_async`` on CUDA, no host sync).
    """
    check_tensor("grad_y", grad_y, ndim=2, dtypes=SUPPORTED_DTYPES)
    check_device_usable("grad_y", grad_y)
    check_tensor("x", x, ndim=2, dtype=grad_y.dtype, device=grad_y.device)
    check_block("bm", bm)
    check_block("bk", bk)
    T, N = grad_y.shape
    if x.shape[0] != T:
        raise ValueError(f"x: expected {T} rows (same T as grad_y), got shape {tuple(x.shape)}")
    K = x.shape[1]
    if N % bm != 0:
        raise ValueError(f"grad_y: expected dim 1 (N={N}) to be a multiple of bm={bm}")
    if K % bk != 0:
        raise ValueError(f"x: expected dim 1 (K={K}) to be a multiple of bk={bk}")
    R, C = N // bm, K // bk
    _check_index("block_rows", block_rows, R * C, grad_y.device)
    _check_index("block_cols", block_cols, R * C, grad_y.device)
    check_tensor("nnz", nnz, ndim=0, dtype=torch.int64, device=grad_y.device)
    cap = R * C if capacity is None else int(capacity)
    if not 0 <= cap <= R * C:
        raise ValueError(f"capacity: expected an int in [0, {R * C}], got {capacity}")
    if cap < R * C and grad_y.is_cuda:
        torch._assert_async(nnz <= cap, "bsl_grad_weight: nnz exceeds capacity")

    grad_w = torch.zeros((N, K), dtype=grad_y.dtype, device=grad_y.device)
    if T == 0 or cap == 0:
        return grad_w
    cfg = get_config("dw", max(bm, bk), grad_y.device, density, grad_y.dtype)
    meta, options = launch_meta("dw", bm, bk, grad_y.dtype, cfg, gelu=gelu_input, tokens_per_split=tokens_per_split)
    splits = triton.cdiv(T, meta["TOKENS_PER_SPLIT"])
    common = dict(**meta, **options)
    args = (block_rows, block_cols, nnz, T, N, K, cap)

    with launch_guard(grad_y):
        if splits == 1:
            _bsl_dw_kernel[(cap, 1)](grad_y, x, grad_w, *args, MODE=0, **common)
        elif deterministic:
            ws = torch.empty((splits, cap, bm, bk), dtype=torch.float32, device=grad_y.device)
            _bsl_dw_kernel[(cap, splits)](grad_y, x, ws, *args, MODE=1, **common)
            _bsl_dw_reduce_kernel[(cap,)](ws, grad_w, block_rows, block_cols, nnz, K, cap, splits, BM=bm, BK=bk,
                                          num_warps=4)
        else:
            acc = grad_w if grad_w.dtype == torch.float32 else torch.zeros((N, K), dtype=torch.float32,
                                                                            device=grad_y.device)
            _bsl_dw_kernel[(cap, splits)](grad_y, x, acc, *args, MODE=2, **common)
            if acc is not grad_w:
                grad_w.copy_(acc)
    return grad_w
