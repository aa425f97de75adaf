"""Block-layout metadata built on device, plus per-matrix top-k thresholds for movement scores.

``build_block_metadata(bitmap)`` turns a bool ``[R, C]`` block bitmap into the index tensors of
design.md ("Block layout metadata"): ``row_ptr``, ``row_cols``, ``col_ptr``, ``col_rows``,
``block_rows`` (``block_cols`` is ``row_cols``) and ``nnz``. Capacity is fixed at ``R*C`` and no
value is copied to the host, so a mask update can run inside a CUDA graph.

Two implementations with identical output:

* a single-program Triton kernel (``_block_metadata_kernel``): the whole padded bitmap is one 2-D
  tile, row/column counts are tile reductions, offsets are ``tl.cumsum`` prefix sums, and the index
  lists are written by masked scatter stores. One launch per layer (BERT-base: 72 launches).
  Used when ``R_pad * C_pad <= 16384`` (64x64 blocks on 3072x768: 48x12 -> 64x16).
* pure tensor ops (``build_block_metadata_torch``): cumsum + scatter into a buffer with one spare
  "dump" slot for the dropped entries; about 15 small kernels, also sync-free. Used for larger
  bitmaps and on CPU without the interpreter.

Padding entries (index ``>= nnz``) of ``row_cols``, ``col_rows`` and ``block_rows`` are 0.

Top-k selection: ``topk_threshold`` / ``topk_mask`` use ``torch.kthvalue`` / ``torch.topk`` on the
flattened scores. Both are device-side selections (radix select on CUDA) with no host sync when
``k`` is a host int given by the pruning schedule. A dedicated Triton histogram-select kernel
is not written yet; the fallback is what the backend uses.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import check_device_usable, check_tensor, interpreting

__all__ = ["BlockMetadata", "build_block_metadata", "build_block_metadata_torch", "topk_threshold", "topk_mask"]

_MAX_TILE = 16384


class BlockMetadata(NamedTuple):
    row_ptr: torch.Tensor  # int32 [R+1]
    row_cols: torch.Tensor  # int32 [R*C]
    col_ptr: torch.Tensor  # int32 [C+1]
    col_rows: torch.Tensor  # int32 [R*C]
    block_rows: torch.Tensor  # int32 [R*C]
    nnz: torch.Tensor  # int64 0-dim

    @property
    def block_cols(self) -> torch.Tensor:
        return self.row_cols


@triton.jit
def _block_metadata_kernel(
    bitmap_ptr, row_ptr_ptr, row_cols_ptr, col_ptr_ptr, col_rows_ptr, block_rows_ptr, nnz_ptr,
    R, C,
    R_PAD: tl.constexpr, C_PAD: tl.constexpr,
):
    offs_r = tl.arange(0, R_PAD)
    offs_c = tl.arange(0, C_PAD)
    in_r = offs_r < R
    in_c = offs_c < C
    valid = in_r[:, None] & in_c[None, :]
    bits = tl.load(bitmap_ptr + offs_r[:, None] * C + offs_c[None, :], mask=valid, other=0)
    kept = (bits != 0) & valid
    ki = kept.to(tl.int32)

    row_cnt = tl.sum(ki, axis=1)  # [R_PAD]
    col_cnt = tl.sum(ki, axis=0)  # [C_PAD]
    row_start = tl.cumsum(row_cnt, axis=0) - row_cnt  # exclusive prefix sums
    col_start = tl.cumsum(col_cnt, axis=0) - col_cnt
    nnz = tl.sum(row_cnt, axis=0)

    # ptr arrays: entry i (< R) is the exclusive prefix, entry R is nnz
    tl.store(row_ptr_ptr + offs_r, row_start, mask=in_r)
    tl.store(col_ptr_ptr + offs_c, col_start, mask=in_c)
    tl.store(row_ptr_ptr + R, nnz)
    tl.store(col_ptr_ptr + C, nnz)
    tl.store(nnz_ptr, nnz.to(tl.int64))

    # position of each kept block in row-major and in column-major order
    pos_rm = row_start[:, None] + tl.cumsum(ki, axis=1) - ki
    pos_cm = col_start[None, :] + tl.cumsum(ki, axis=0) - ki
    rr = offs_r[:, None] + offs_c[None, :] * 0
    cc = offs_c[None, :] + offs_r[:, None] * 0
    tl.store(row_cols_ptr + pos_rm, cc, mask=kept)
    tl.store(block_rows_ptr + pos_rm, rr, mask=kept)
    tl.store(col_rows_ptr + pos_cm, rr, mask=kept)

    # zero the padding [nnz, R*C): disjoint from the scatter targets, so no ordering is needed
    flat = offs_r[:, None] * C + offs_c[None, :]
    pad = valid & (flat >= nnz)
    zero = tl.zeros((R_PAD, C_PAD), dtype=tl.int32)
    tl.store(row_cols_ptr + flat, zero, mask=pad)
    tl.store(block_rows_ptr + flat, zero, mask=pad)
    tl.store(col_rows_ptr + flat, zero, mask=pad)


def _alloc(R: int, C: int, device) -> BlockMetadata:
    i32 = dict(dtype=torch.int32, device=device)
    return BlockMetadata(
        row_ptr=torch.empty(R + 1, **i32), row_cols=torch.empty(R * C, **i32),
        col_ptr=torch.empty(C + 1, **i32), col_rows=torch.empty(R * C, **i32),
        block_rows=torch.empty(R * C, **i32), nnz=torch.empty((), dtype=torch.int64, device=device),
    )


def _check_out(out: BlockMetadata, R: int, C: int, device) -> None:
    for name, n in (("row_ptr", R + 1), ("row_cols", R * C), ("col_ptr", C + 1), ("col_rows", R * C),
                     ("block_rows", R * C)):
        check_tensor(f"out.{name}", getattr(out, name), ndim=1, dtype=torch.int32, device=device, shape=(n,))
    check_tensor("out.nnz", out.nnz, ndim=0, dtype=torch.int64, device=device)


def build_block_metadata_torch(bitmap: torch.Tensor, out: Optional[BlockMetadata] = None) -> BlockMetadata:
    """Pure tensor-op version of :func:`build_block_metadata` (any device, no host sync)."""
    check_tensor("bitmap", bitmap, ndim=2, dtype=torch.bool)
    R, C = bitmap.shape
    dev = bitmap.device
    if out is None:
        out = _alloc(R, C, dev)
    else:
        _check_out(out, R, C, dev)
    n = R * C
    ar = torch.arange(n, device=dev)
    for order, ptr_t, idx_t, idx_val in (("row", out.row_ptr, out.row_cols, ar % max(C, 1)),
                                          ("col", out.col_ptr, out.col_rows, ar % max(R, 1))):
        m = bitmap if order == "row" else bitmap.t()
        flat = m.reshape(-1).to(torch.int32)
        counts = m.sum(dim=1, dtype=torch.int32)
        ptr_t[0] = 0
        torch.cumsum(counts, 0, out=ptr_t[1:])
        pos = torch.cumsum(flat, 0) - flat
        # dropped entries go to a spare slot n, so the scatter never needs the count on the host
        pos = torch.where(flat.bool(), pos.long(), torch.full_like(ar, n))
        buf = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        buf.scatter_(0, pos, idx_val.to(torch.int32))
        idx_t.copy_(buf[:n])
        if order == "row":
            buf.zero_()
            buf.scatter_(0, pos, (ar // max(C, 1)).to(torch.int32))
            out.block_rows.copy_(buf[:n])
    out.nnz.copy_(bitmap.sum())
    return out


def build_block_metadata(bitmap: torch.Tensor, out: Optional[BlockMetadata] = None) -> BlockMetadata:
    """Bitmap bool ``[R, C]`` -> :class:`BlockMetadata` on the bitmap's device, no host sync.

    ``out`` may hold preallocated tensors (for example a ``BlockLayout``'s fixed-capacity buffers);
    they are overwritten in place, which keeps the call CUDA-graph capturable.
    """
    check_tensor("bitmap", bitmap, ndim=2, dtype=torch.bool)
    R, C = bitmap.shape
    dev = bitmap.device
    usable = dev.type == "cuda" or (dev.type == "cpu" and interpreting())
    r_pad, c_pad = triton.next_power_of_2(max(R, 1)), triton.next_power_of_2(max(C, 1))
    if not usable or r_pad * c_pad > _MAX_TILE or R * C == 0:
        return build_block_metadata_torch(bitmap, out)
    check_device_usable("bitmap", bitmap)
    if out is None:
        out = _alloc(R, C, dev)
    else:
        _check_out(out, R, C, dev)
    _block_metadata_kernel[(1,)](
        bitmap.view(torch.uint8), out.row_ptr, out.row_cols, out.col_ptr, out.col_rows, out.block_rows, out.nnz,
        R, C, R_PAD=r_pad, C_PAD=c_pad, num_warps=4,
    )
    return out


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0-dim tensor ``t`` such that ``scores >= t`` keeps the ``k`` largest scores (more on ties).

    ``k`` is a host int (from the sparsity schedule). ``k == 0`` gives ``+inf``; ``k >= numel`` gives
    ``-inf``. Uses ``torch.kthvalue`` (device radix select, no host sync).
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k: expected an int in [0, {n}], got {k}")
    if k == 0:
        return torch.full((), float("inf"), dtype=scores.dtype, device=scores.device)
    if k == n:
        return torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    return torch.kthvalue(flat, n - k + 1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape with exactly ``k`` True entries (the largest; ties by ``torch.topk``)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k: expected an int in [0, {n}], got {k}")
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(0, torch.topk(flat, k, sorted=False).indices, True)
    return mask.view(scores.shape)
