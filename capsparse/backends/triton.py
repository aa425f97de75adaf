"""Triton backend: the primitives of docs/design.md on the kernels in ``capsparse.kernels``.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests). The
kernels are imported lazily inside each function so that importing this module neither imports
triton nor touches a GPU.

Density dispatch: the block-sparse primitives take the op's host-side ``density`` hint (kept
fraction; ``None`` when unknown). Below the crossover *sparsity* of the block size the block-sparse
kernels lose to one dense cuBLAS GEMM with the block mask multiplied in, so that runs instead (the
mask is expanded from the device metadata: no host sync). ``CROSSOVER_SPARSITY`` holds the design
goals, **not measurements**; ``scripts/gpu_check.py`` measures the kernels on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference

_NO_DEVICE = "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors, slowly)"

#: the block-sparse primitives accept ``density=`` (read by capsparse.ops.block_sparse_linear)
DENSITY_HINT = True
#: smaller block side -> sparsity from which the Triton kernels run (unmeasured design goals)
CROSSOVER_SPARSITY = {16: 0.90, 32: 0.70, 64: 0.50, 128: 0.40}


def is_available() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if not torch.cuda.is_available():
        return False, _NO_DEVICE
    return True, "triton on CUDA"


def use_dense(density: Optional[float], bm: int, bk: int) -> bool:
    """True when a layer with kept fraction ``density`` is below the crossover (``None``: sparse)."""
    return density is not None and 1.0 - density < CROSSOVER_SPARSITY[min(bm, bk)]


def bsl_forward(x, weight, bias, row_ptr, row_cols, bm: int, bk: int, density: Optional[float] = None):
    if use_dense(density, bm, bk):
        return reference.bsl_forward(x, weight, bias, row_ptr, row_cols, bm, bk)
    from capsparse.kernels.block_sparse import bsl_forward as launch
    return launch(x, weight, bias, row_ptr, row_cols, bm, bk, density=density)


def bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm: int, bk: int, density: Optional[float] = None):
    if use_dense(density, bm, bk):
        return reference.bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm, bk)
    from capsparse.kernels.block_sparse import bsl_grad_input as launch
    return launch(grad_y, weight, col_ptr, col_rows, bm, bk, density=density)


def bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm: int, bk: int, density: Optional[float] = None):
    if use_dense(density, bm, bk):
        return reference.bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm, bk)
    from capsparse.kernels.block_sparse import bsl_grad_weight as launch
    return launch(grad_y, x, block_rows, block_cols, nnz, bm, bk, density=density)


def masked_linear_forward(x, masked_weight, bias):
    # masked_weight = W * M is made by the layer once per weight/mask change: a dense GEMM, and
    # cuBLAS is the fastest one (a mask-on-load GEMM can at best match it).
    return F.linear(x, masked_weight, bias)


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature: float,
                    normalization: str):
    from capsparse.kernels.contrastive import cap_contrastive as launch
    return launch(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature, normalization)
