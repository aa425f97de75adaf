"""Triton kernels for capsparse, installed as ``capsparse.kernels``.

Submodules (import them explicitly; importing this package does not import triton):

* ``block_sparse``   block-sparse linear: forward, dX, dW (kept blocks, split-K), bias / GELU fusion
* ``contrastive``    fused CAP contrastive loss (online log-sum-exp, split over the keys)

``capsparse.backends.triton`` is their only caller (it also holds the dense fallback below the
crossover sparsity). This directory must only ever be imported as ``capsparse.kernels``.
"""

__all__ = ["block_sparse", "contrastive"]
