"""Triton kernels for capsparse, installed as ``capsparse.kernels``.

Submodules (import them explicitly; importing this package does not import triton):

* ``block_sparse``   block-sparse linear: forward, dX, dW (kept blocks, split-K), bias / GELU fusion
* ``contrastive``    fused CAP contrastive loss (online log-sum-exp, split over the keys)

``capsparse.backends.triton`` is their only caller (it also holds the dense fallback below the
crossover sparsity). It lives inside the package: a top-level ``kernels/`` directory was shadowed by, and
shadowed, Hugging Face's ``kernels`` package (a transformers dependency) whenever the repository root was on
``sys.path``.
"""

__all__ = ["block_sparse", "contrastive"]
