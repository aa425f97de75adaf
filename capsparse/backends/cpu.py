"""The ``cpu`` backend: C++/OpenMP kernels from ``capsparse._C`` (sources in ``csrc/cpu/``).

* block-sparse linear: packed, register-blocked fp32 kernels (AVX-512 or AVX2+FMA, whichever the
  build machine has) for block sizes that are multiples of 16; a plain templated path for fp64 and
  other block sizes; fp16/bf16 are computed in fp32. Results are bitwise independent of the
  number of threads.
* above a crossover density (``DENSE_ABOVE``, per block size, measured with
  ``benchmarks/bench_kernels_cpu.py``) the forward and dX use dense ``F.linear`` / ``mm`` with the
  masked weight instead, because MKL wins there.
* the CAP contrastive loss is one fused pass over the keys (online log-sum-exp) that returns the
  losses and their gradients wrt ``q``.

``capsparse._C`` is imported lazily (after torch), never at module import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..layout import bitmap_from_compressed, expand_bitmap
from ._extension import LazyExtension
from .reference import check_normalization

_BUILD_HINT = "capsparse._C is not built; run `pip install -e . --no-build-isolation`"

# Densities (kept blocks / capacity) above which the forward and dX use dense MKL with the masked
# weight, per SIMD level of the build and per block size. AVX-512 builds: measured on the 2-core
# EPYC dev machine (docs/benchmarks-cpu-kernels.md): the sparse kernels beat MKL's dense sgemm even
# at density 1 there (MKL runs its AVX2 code on AMD), so the fallback never triggers. AVX2 builds
# (6 x 16 tiles), same machine, BERT FFN-up: 0.89-0.93x dense at 0% and 0.90x at 30% sparsity,
# 2.1-2.8x at 50%: dense above 60% density. Override with CAPSPARSE_CPU_DENSE_ABOVE=<density>.
DENSE_ABOVE = {
    "avx512f": {16: 1.01, 32: 1.01, 64: 1.01},
    "avx2+fma": {16: 0.6, 32: 0.6, 64: 0.6},
    "scalar": {16: 0.05, 32: 0.05, 64: 0.05},
}
_DEFAULT_DENSE_ABOVE = 0.6

_C = LazyExtension("capsparse._C")  # the compiled kernels, imported on first use (torch is imported above)


def is_available() -> Tuple[bool, str]:
    try:
        _C()
    except ImportError as exc:  # not built, or built against another torch
        return False, f"{_BUILD_HINT} ({exc})"
    return True, "capsparse._C " + _C().simd_info()


_SIMD: Optional[str] = None


def _simd_level() -> str:
    """``avx512f`` / ``avx2+fma`` / ``scalar``: the vector code the extension was built with (cached)."""
    global _SIMD
    if _SIMD is None:
        _SIMD = _C().simd_info().split()[0]
    return _SIMD


def _dense_above(bm: int, bk: int) -> float:
    env = os.environ.get("CAPSPARSE_CPU_DENSE_ABOVE")
    if env:
        return float(env)
    table = DENSE_ABOVE.get(_simd_level(), {})
    return table.get(min(bm, bk), _DEFAULT_DENSE_ABOVE)


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if (t.dtype == torch.int32 and t.is_contiguous()) else t.to(torch.int32).contiguous()


def bsl_forward(x, weight, bias, row_ptr, row_cols, bm: int, bk: int, out: Optional[torch.Tensor] = None):
    """``y[T,N] = x[T,K] @ (W * block mask)^T (+ bias)`` over the kept blocks of each block-row.

    ``out``: optional preallocated contiguous ``[T, N]`` result (avoids first-touch of a fresh buffer).
    """
    n, k = weight.shape
    capacity = (n // bm) * (k // bk)
    if capacity and int(row_ptr[-1]) > _dense_above(bm, bk) * capacity:
        w = weight * expand_bitmap(bitmap_from_compressed(row_ptr, row_cols, k // bk), (bm, bk)).to(weight.dtype)
        if out is not None:
            return torch.addmm(bias, x, w.t(), out=out) if bias is not None else torch.mm(x, w.t(), out=out)
        return F.linear(x, w, bias)
    return _C().bsl_forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                            _index(row_ptr), _index(row_cols), int(bm), int(bk), out)


def bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm: int, bk: int, out: Optional[torch.Tensor] = None):
    """``grad_x[T,K] = grad_y[T,N] @ (W * block mask)`` over the kept blocks of each block-column."""
    n, k = weight.shape
    capacity = (n // bm) * (k // bk)
    if capacity and int(col_ptr[-1]) > _dense_above(bm, bk) * capacity:
        w = weight * expand_bitmap(bitmap_from_compressed(col_ptr, col_rows, n // bm).t(), (bm, bk)).to(weight.dtype)
        return torch.mm(grad_y, w, out=out) if out is not None else grad_y @ w
    return _C().bsl_grad_input(grad_y.contiguous(), weight.contiguous(), _index(col_ptr), _index(col_rows),
                               int(bm), int(bk), out)


def bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm: int, bk: int):
    """``grad_w[N,K]``: ``grad_y^T @ x`` on the kept blocks, exactly 0 elsewhere.

    Always the sparse kernel: it beats dense + masking at every density measured.
    """
    return _C().bsl_grad_weight(grad_y.contiguous(), x.contiguous(), _index(block_rows), _index(block_cols),
                                int(nnz), int(bm), int(bk))


def bsl_grad_weight_blocks(grad_y, x, block_rows, block_cols, nnz, bm: int, bk: int):
    """The kept blocks of ``grad_y^T @ x`` only: ``[nnz, bm, bk]`` in block order (no zero-filled ``[N, K]``)."""
    return _C().bsl_grad_weight(grad_y.contiguous(), x.contiguous(), _index(block_rows), _index(block_cols),
                                int(nnz), int(bm), int(bk), compact=True)


def bsl_grad_bias(grad_y):
    """``grad_b[N] = grad_y[T, N].sum(0)``: one streaming pass, about 2x faster than ``sum(0)`` at T = 4096."""
    return _C().bsl_grad_bias(grad_y.contiguous())


# Densities (nonzeros of W * M / all) at or below which the masked-linear forward runs the CSR kernel
# on a cached compressed copy of W * M instead of dense F.linear, per SIMD level of the build (measured
# with benchmarks/bench_headline.py and the crossover sweep in docs/benchmarks.md). Override with
# CAPSPARSE_CPU_CSR_BELOW=<density> (0 disables the CSR path).
CSR_BELOW = {"avx512f": 0.3, "avx2+fma": 0.3, "scalar": 0.0}
_CSR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CSRWeight(NamedTuple):
    """A weight ``[out, in]`` in CSR: int32 ``row_ptr [out + 1]`` and ``col_idx [nnz]``, fp32 ``values``."""
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: Tuple[int, int]

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.values.numel() / (n * k) if n * k else 0.0


def csr_from_dense(weight: torch.Tensor) -> CSRWeight:
    """The nonzeros of a 2-D CPU float ``weight`` in row-major CSR (values in fp32)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"weight: expected a 2-D CPU tensor, got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    w = weight.detach()
    n, k = w.shape
    if n * k >= 2 ** 31:
        raise ValueError(f"weight: {n}x{k} has too many entries for int32 CSR indices")
    nz = w != 0
    counts = nz.sum(1, dtype=torch.int32)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    col_idx = nz.nonzero()[:, 1].to(torch.int32).contiguous()
    values = w[nz].to(torch.float32).contiguous()  # boolean indexing is row-major: matches col_idx
    return CSRWeight(row_ptr, col_idx, values, (int(n), int(k)))


def csr_linear_reference(x: torch.Tensor, csr: CSRWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch: rebuild the dense weight from ``csr`` and call ``F.linear`` (in fp32, cast back)."""
    n, k = csr.shape
    rows = torch.repeat_interleave(torch.arange(n), csr.row_ptr.diff().to(torch.int64))
    w = torch.zeros(n, k, dtype=torch.float32)
    w[rows, csr.col_idx.to(torch.int64)] = csr.values
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)


def csr_linear(x: torch.Tensor, csr: CSRWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x (..., in) @ W^T + bias`` with ``W`` in CSR (inference: no autograd). fp32 / bf16 / fp16 inputs;
    the products accumulate in fp32."""
    if x.dtype not in _CSR_DTYPES:
        raise TypeError(f"x: expected one of {_CSR_DTYPES}, got {x.dtype}")
    n, k = csr.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: expected {k} features (the weight's in_features), got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    y = _C().csr_linear(x.reshape(-1, k).contiguous(), csr.row_ptr, csr.col_idx, csr.values,
                        None if bias is None else bias.detach(), int(k))
    return y.reshape(*lead, n)


def _csr_below() -> float:
    env = os.environ.get("CAPSPARSE_CPU_CSR_BELOW")
    if env:
        return float(env)
    return CSR_BELOW.get(_simd_level(), 0.0)


# W * M tensor -> (its version, CSRWeight or None when too dense); dies with the tensor
_CSR_CACHE = WeakIdKeyDictionary()


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter (and cannot change outside inference mode)
        return None


def _cached_csr(masked_weight: torch.Tensor) -> Optional[CSRWeight]:
    hit = _CSR_CACHE.get(masked_weight)
    version = _version(masked_weight)
    if hit is not None and hit[0] == version:
        return hit[1]
    n, k = masked_weight.shape
    limit = _csr_below()
    csr = None
    if limit > 0 and n * k:
        nnz = int(torch.count_nonzero(masked_weight))
        if nnz <= limit * n * k:
            csr = csr_from_dense(masked_weight)
    _CSR_CACHE[masked_weight] = (version, csr)
    return csr


def masked_linear_forward(x, masked_weight, bias):
    """``F.linear(x, W * M, bias)``; when ``W * M`` is sparse enough (``CSR_BELOW``) the CSR kernel on a
    compressed copy cached per ``W * M`` tensor (the forward value only: the backward stays dense)."""
    if (x.dtype == masked_weight.dtype and x.dtype in _CSR_DTYPES and x.dim() == 2 and x.device.type == "cpu"
            and (bias is None or bias.dtype == x.dtype)):
        csr = _cached_csr(masked_weight)
        if csr is not None:
            return csr_linear(x, csr, bias)
    return F.linear(x, masked_weight, bias)


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index,
                    temperature: float, normalization: str):
    """Fused CAP losses and grads wrt ``q`` (see docs/design.md); keys are constants."""
    check_normalization(normalization)
    ql = kl = None
    if query_labels is not None and key_labels is not None:
        ql, kl = query_labels.to(torch.int64), key_labels.to(torch.int64)
    return _C().cap_contrastive(q.detach().contiguous(), k.detach().contiguous(), query_ids.to(torch.int64),
                                key_ids.to(torch.int64), ql, kl, exclude_index.to(torch.int64),
                                float(temperature), normalization)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR: Dict[str, object] = {}


def configure_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 2 ** 31 - 1) -> Dict[str, object]:
    """Keep large freed tensors in the process heap instead of returning them to the OS (glibc only).

    glibc serves every allocation above its mmap threshold (at most 32 MB with the default dynamic
    threshold) with fresh zero pages and unmaps it on free, so each fresh activation of that size pays
    one page fault per 4 KB page again: a 4096 x 3072 fp32 output (48 MB) costs about as much to fault in
    as a 90%-sparse product takes to compute. Raising the mmap threshold and the trim threshold makes
    freed blocks reusable (measured in docs/benchmarks.md). The cost: the heap keeps its high-water mark
    (freed memory stays resident for reuse). Process-wide, never applied at import: call it once, e.g.
    at the start of a training or inference script (the CLI and ``capsparse bench`` do). The same effect
    without code: ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.

    Returns ``{"applied": bool, "reason"|"mmap_threshold"/"trim_threshold": ...}``.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2 ** 31 - 1:
            raise ValueError(f"{name}: expected an int in [0, 2**31 - 1] (bytes), got {value!r}")
    if not sys.platform.startswith("linux"):
        return {"applied": False, "reason": f"not glibc (platform {sys.platform})"}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return {"applied": False, "reason": f"no glibc mallopt ({exc})"}
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        return {"applied": False, "reason": "mallopt refused the values"}
    _ALLOCATOR.update(applied=True, mmap_threshold=mmap_threshold, trim_threshold=trim_threshold)
    return dict(_ALLOCATOR)


def allocator_state() -> Dict[str, object]:
    """What :func:`configure_allocator` applied in this process (``{"applied": False}`` if never called)."""
    return dict(_ALLOCATOR) if _ALLOCATOR else {"applied": False}


def set_tuning(token_tile: int = 0, dw_chunk: int = 0, order: int = 0, strip: int = 0) -> None:
    """Token tile and loop order (1 weight-strip outer, 2 token-row outer) of the forward/dX
    kernels, token chunk of dW, and the packed weight's strip width (16, or 32 on AVX-512 builds
    where it divides the block); 0 = automatic. For benchmarks and tuning."""
    _C().set_tuning(int(token_tile), int(dw_chunk), int(order), int(strip))


def set_csr_tuning(tile: int = 0, chunk_bytes: int = 0, rows: int = 0) -> None:
    """The CSR kernel's token tile (32, 64 or 128), bytes of transposed input per column chunk, and output
    rows advanced together (1, 2 or 4); 0 = automatic. Results do not depend on them. For benchmarks and tuning."""
    _C().set_csr_tile(int(tile), int(chunk_bytes), int(rows))


def dropout(x, p: float, seed):
    """Seed-determined dropout (``capsparse.ops.dropout``): Philox words, AVX2 for fp32, one pass, no mask saved."""
    return _C().dropout_apply(x, float(p), seed)
