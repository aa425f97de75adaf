"""The ``cuda`` backend: hand-written CUDA kernels from ``capsparse._C_cuda`` (``csrc/cuda/``).

**Not verified on a GPU.** These kernels have been compile-checked with nvcc 13.0 for sm_80 and
sm_90a (``.ci/nvcc_check.sh``) but have NOT been run on a GPU yet: no correctness run and no
timing exists. ``tests/test_cuda_backend.py`` holds the checks to run on the first CUDA machine;
until they pass there, prefer the ``triton`` or ``reference`` backend on CUDA. See ``docs/cuda.md``.

* block-sparse linear: tensor-core (WMMA, fp16/bf16 in, fp32 accumulate) and SIMT fp32 kernels
  for 32x32 and 64x64 blocks, reading kept blocks straight from the dense weight; forward over
  block-rows with the bias fused, dX over block-columns (``col_ptr``/``col_rows``), dW on kept
  blocks only with deterministic split-K over tokens. Other block sizes fall back to the
  ``reference`` backend.
* ``build_block_metadata``: bitmap -> layout metadata on the device, no host sync.
* ``cap_contrastive`` / ``cap_contrastive_bank``: CAP's contrastive step with the memory-bank
  gather inside the kernels (no materialised K x D key copy), both normalisations, grads wrt q.

``capsparse._C_cuda`` is imported lazily inside the functions, never at module import, so this
module imports fine on CPU-only machines and with a CPU build of torch.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference
from ._extension import LazyExtension
from .reference import check_normalization

#: False until tests/test_cuda_backend.py has passed on a real GPU (then record the GPU in docs/cuda.md).
VERIFIED_ON_GPU = False

SUPPORTED_BLOCKS = ((32, 32), (64, 64))

_NO_DEVICE = "no CUDA device"
_NOT_BUILT = "capsparse._C_cuda not built (needs a CUDA build of torch)"

_C = LazyExtension("capsparse._C_cuda")  # the compiled kernels, imported on first use


def is_available() -> Tuple[bool, str]:
    """``(available, reason)``; never raises."""
    try:
        has_device = torch.cuda.is_available()
    except Exception:  # a broken driver install counts as no device
        has_device = False
    if not has_device:
        return False, _NO_DEVICE
    try:
        _C()
    except ImportError:
        return False, _NOT_BUILT + _build_error()
    return True, "capsparse._C_cuda (compile-checked only; kernels not yet verified on a GPU)"


def _build_error() -> str:
    """Why setup.py skipped the extension, if it recorded a failed build (``capsparse/_C_cuda_build_error.txt``)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C_cuda_build_error.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return f"; its build failed at install: {f.read().strip()[:300]}"
    except OSError:
        return ""


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if (t.dtype == torch.int32 and t.is_contiguous()) else t.to(torch.int32).contiguous()


def _supported(bm: int, bk: int) -> bool:
    return (int(bm), int(bk)) in SUPPORTED_BLOCKS


def bsl_forward(x, weight, bias, row_ptr, row_cols, bm: int, bk: int):
    """``y[T,N] = sum over kept blocks of x[:, cols(c)] @ W[rows(r), cols(c)]^T (+ bias)``."""
    if not _supported(bm, bk):
        return reference.bsl_forward(x, weight, bias, row_ptr, row_cols, bm, bk)
    return _C().bsl_forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                            _index(row_ptr), _index(row_cols), int(bm), int(bk))


def bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm: int, bk: int):
    """``grad_x[T,K]`` over block-columns (no transposed copy of W)."""
    if not _supported(bm, bk):
        return reference.bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm, bk)
    return _C().bsl_grad_input(grad_y.contiguous(), weight.contiguous(), _index(col_ptr), _index(col_rows),
                               int(bm), int(bk))


def bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm: int, bk: int):
    """``grad_w[N,K]``: kept blocks ``grad_y^T @ x`` (split-K, deterministic), exactly 0 elsewhere."""
    if not _supported(bm, bk):
        return reference.bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm, bk)
    if not isinstance(nnz, torch.Tensor):
        nnz = torch.tensor(int(nnz), dtype=torch.int64, device=x.device)
    elif nnz.dtype != torch.int64 or nnz.device != x.device:
        nnz = nnz.to(device=x.device, dtype=torch.int64)
    return _C().bsl_grad_weight(grad_y.contiguous(), x.contiguous(), _index(block_rows), _index(block_cols),
                                nnz.reshape(()).contiguous(), int(bm), int(bk))


def masked_linear_forward(x, masked_weight, bias):
    """Dense cuBLAS GEMM with the pre-masked weight (made once per mask/weight change)."""
    return F.linear(x, masked_weight, bias)


def build_block_metadata(bitmap: torch.Tensor):
    """``bitmap [R, C]`` (bool/uint8, CUDA) -> ``(row_ptr, row_cols, col_ptr, col_rows, block_rows, nnz)``.

    One kernel launch, fixed capacity ``R*C``, no host sync; ``block_cols`` is ``row_cols``.
    """
    return _C().build_block_metadata(bitmap)


def _i64(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if t is None else t.to(device=device, dtype=torch.int64).contiguous()


def cap_contrastive_bank(q, bank, key_index, query_ids, key_ids, query_labels=None, key_labels=None,
                         exclude_index=None, temperature: float = 0.1, normalization: str = "official",
                         extra_keys: Optional[torch.Tensor] = None):
    """CAP contrastive step with the keys gathered from ``bank`` inside the kernels.

    keys = ``bank[key_index]`` (``[K, D]``, never materialised) followed by ``extra_keys``
    (``[E, D]``, optional in-batch keys, cast to the bank's dtype). ``key_ids`` / ``key_labels``
    and ``exclude_index`` refer to these ``K + E`` keys. Returns
    ``(loss_u, loss_s | None, grad_q_u, grad_q_s | None)`` as in ``docs/design.md``.
    """
    check_normalization(normalization)
    dev = q.device
    if exclude_index is None:
        exclude_index = torch.full((q.shape[0],), -1, dtype=torch.int64, device=dev)
    if extra_keys is not None:
        extra_keys = extra_keys.detach().to(bank.dtype).contiguous()
    ql = kl = None
    if query_labels is not None and key_labels is not None:
        ql, kl = _i64(query_labels, dev), _i64(key_labels, dev)
    return _C().cap_contrastive_bank(q.detach().contiguous(), bank.detach().contiguous(), _i64(key_index, dev),
                                     extra_keys, _i64(query_ids, dev), _i64(key_ids, dev), ql, kl,
                                     _i64(exclude_index, dev), float(temperature), normalization)


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index,
                    temperature: float, normalization: str):
    """The design.md primitive: keys given directly (``key_index = arange(K)`` into ``k``)."""
    key_index = torch.arange(k.shape[0], dtype=torch.int64, device=k.device)
    return cap_contrastive_bank(q, k, key_index, query_ids, key_ids, query_labels, key_labels, exclude_index,
                                temperature, normalization)
