"""Dense fallback below the crossover sparsity.

During a pruning schedule the sparsity ramps from 0 to 90-97%. While a layer is still dense-ish the
block-sparse kernels are slower than cuBLAS, so the sparse products dispatch to dense torch GEMMs
with the block mask applied (``W * expand(bitmap)``), and switch to the Triton kernels once the
sparsity reaches the crossover for the block size.

``CROSSOVER_SPARSITY`` values are **placeholders, unmeasured**: they are the design goals (B6 in
the kernel notes: speedup 1.0 at <= 50% sparsity for 64x64 blocks, <= 70% for 32x32), not
measurements. A GPU benchmark sweep must replace them (``set_crossover``).

The decision uses a host-side density (the schedule's target), never ``nnz.item()``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["CROSSOVER_SPARSITY", "CROSSOVER_STATUS", "crossover_sparsity", "set_crossover", "use_block_sparse",
           "expand_block_mask", "dispatch_forward", "dispatch_grad_input", "dispatch_grad_weight"]

# block size -> sparsity at which block-sparse starts to win (status: "unmeasured")
CROSSOVER_SPARSITY: Dict[int, float] = {16: 0.90, 32: 0.70, 64: 0.50, 128: 0.40}
CROSSOVER_STATUS: Dict[int, str] = {b: "unmeasured" for b in CROSSOVER_SPARSITY}


def crossover_sparsity(bm: int, bk: int) -> float:
    """Crossover for a ``(bm, bk)`` block: the value of the smaller side (the worse of the two)."""
    b = min(bm, bk)
    if b not in CROSSOVER_SPARSITY:
        raise ValueError(f"bm, bk: expected block sides in {tuple(CROSSOVER_SPARSITY)}, got ({bm}, {bk})")
    return CROSSOVER_SPARSITY[b]


def set_crossover(block: int, sparsity: float, status: str = "measured") -> None:
    """Replace a table entry with a measured value (e.g. from a benchmark sweep on the target GPU)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity: expected a float in [0, 1], got {sparsity}")
    CROSSOVER_SPARSITY[block] = float(sparsity)
    CROSSOVER_STATUS[block] = status


def use_block_sparse(density: float, bm: int, bk: int) -> bool:
    """True when the block-sparse kernels should run for a layer at ``density`` (kept fraction)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a float in [0, 1], got {density}")
    return (1.0 - density) >= crossover_sparsity(bm, bk)


def expand_block_mask(bitmap: torch.Tensor, bm: int, bk: int, dtype: torch.dtype) -> torch.Tensor:
    """``[R, C]`` bool -> ``[R*bm, C*bk]`` 0/1 tensor of ``dtype``."""
    return bitmap.to(dtype).repeat_interleave(bm, 0).repeat_interleave(bk, 1)


def dispatch_forward(x, weight, bias, bitmap, row_ptr, row_cols, bm: int, bk: int, density: float,
                     masked_weight: Optional[torch.Tensor] = None):
    """``y = x (W*M)^T + b``: Triton block-sparse above the crossover, dense torch GEMM below it.

    ``masked_weight`` (``W*M``, made once per mask/weight change by the layer) avoids re-masking.
    """
    if use_block_sparse(density, bm, bk):
        from .block_sparse import bsl_forward
        return bsl_forward(x, weight, bias, row_ptr, row_cols, bm, bk, density=density)
    if masked_weight is None:
        masked_weight = weight * expand_block_mask(bitmap, bm, bk, weight.dtype)
    return F.linear(x, masked_weight, bias)


def dispatch_grad_input(grad_y, weight, bitmap, col_ptr, col_rows, bm: int, bk: int, density: float,
                        masked_weight: Optional[torch.Tensor] = None):
    if use_block_sparse(density, bm, bk):
        from .block_sparse import bsl_grad_input
        return bsl_grad_input(grad_y, weight, col_ptr, col_rows, bm, bk, density=density)
    if masked_weight is None:
        masked_weight = weight * expand_block_mask(bitmap, bm, bk, weight.dtype)
    return grad_y @ masked_weight


def dispatch_grad_weight(grad_y, x, bitmap, block_rows, block_cols, nnz, bm: int, bk: int, density: float):
    if use_block_sparse(density, bm, bk):
        from .block_sparse import bsl_grad_weight
        return bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm, bk, density=density)
    return (grad_y.t() @ x) * expand_block_mask(bitmap, bm, bk, x.dtype)
