"""Triton kernels for capsparse, installed as ``capsparse.kernels``.

Submodules (import them explicitly; importing this package does not import triton):

* ``block_sparse``   block-sparse linear: forward, dX, dW (kept blocks, split-K), bias / GELU fusion
* ``masked_matmul``  masked GEMM for unstructured masks, mask applied on load from a packed bitmask
* ``metadata``       bitmap -> row_ptr/row_cols/col_ptr/col_rows/block_rows/nnz on device; top-k thresholds
* ``contrastive``    fused CAP / InfoNCE / CLIP / SupCon contrastive losses (online log-sum-exp)
* ``dispatch``       dense fallback below the crossover density

This directory must only ever be imported as ``capsparse.kernels`` (relative imports inside).
"""

__all__ = ["block_sparse", "masked_matmul", "metadata", "contrastive", "dispatch"]
