"""Triton backend: the primitives of docs/design.md on the kernels in ``capsparse.kernels``.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests). The
kernels are imported lazily inside each function so that importing this module neither imports
triton nor touches a GPU.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch
import torch.nn.functional as F

_NO_DEVICE = "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors, slowly)"


def is_available() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if not torch.cuda.is_available():
        return False, _NO_DEVICE
    return True, "triton on CUDA"


def bsl_forward(x, weight, bias, row_ptr, row_cols, bm: int, bk: int):
    from capsparse.kernels.block_sparse import bsl_forward as launch
    return launch(x, weight, bias, row_ptr, row_cols, bm, bk)


def bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm: int, bk: int):
    from capsparse.kernels.block_sparse import bsl_grad_input as launch
    return launch(grad_y, weight, col_ptr, col_rows, bm, bk)


def bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm: int, bk: int):
    from capsparse.kernels.block_sparse import bsl_grad_weight as launch
    return launch(grad_y, x, block_rows, block_cols, nnz, bm, bk)


def masked_linear_forward(x, masked_weight, bias):
    # masked_weight = W * M is already made by the layer: this is a dense GEMM, and cuBLAS is the
    # fastest one. The mask-on-load kernel (capsparse.kernels.masked_matmul) is for callers that
    # keep only W and a packed bitmask.
    return F.linear(x, masked_weight, bias)


def cap_contrastive(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature: float,
                    normalization: str):
    from capsparse.kernels.contrastive import cap_contrastive as launch
    return launch(q, k, query_ids, key_ids, query_labels, key_labels, exclude_index, temperature, normalization)
