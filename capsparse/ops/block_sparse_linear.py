"""Block-sparse linear: ``y = x (W * expand(bitmap))^T + b`` with forward, dX and dW on kept blocks.

Chain: backend primitive (``capsparse.backends.<name>.bsl_*``) -> ``torch.library`` custom ops
``capsparse::bsl_forward / bsl_grad_input / bsl_grad_weight`` (with fake implementations, so
``torch.compile`` traces them) -> :class:`BlockSparseLinearFunction` -> :func:`block_sparse_linear`.
:func:`block_sparse_linear_reference` is the plain PyTorch oracle.

``density`` is an optional host-side hint (kept fraction, e.g. the pruning schedule's target) that
reaches the backends declaring ``DENSITY_HINT = True`` (the ``triton`` backend uses it to run dense
cuBLAS below its crossover sparsity); ``-1.0`` in the custom ops means unknown. It never syncs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backends.registry import get_backend, resolve_backend
from ..layout import BlockLayout, check_weight
from ._autocast import autocast_dtype, autocast_off, cast
from ._checks import check_linear_inputs


def block_sparse_linear_reference(x, weight, layout: BlockLayout, bias=None):
    """Dense ``F.linear`` with the block mask multiplied in; autograd gives the masked dW."""
    return F.linear(x, weight * layout.to_dense_mask().to(weight.dtype), bias)


def _call(backend: str, primitive: str, args, density: float):
    module = get_backend(backend)
    hint = {"density": density if density >= 0 else None} if getattr(module, "DENSITY_HINT", False) else {}
    return getattr(module, primitive)(*args, **hint)


@torch.library.custom_op("capsparse::bsl_forward", mutates_args=())
def _bsl_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], row_ptr: torch.Tensor,
                 row_cols: torch.Tensor, bm: int, bk: int, backend: str, density: float) -> torch.Tensor:
    return _call(backend, "bsl_forward", (x, weight, bias, row_ptr, row_cols, bm, bk), density)


@_bsl_forward.register_fake
def _(x, weight, bias, row_ptr, row_cols, bm, bk, backend, density):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("capsparse::bsl_grad_input", mutates_args=())
def _bsl_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, col_ptr: torch.Tensor, col_rows: torch.Tensor,
                    bm: int, bk: int, backend: str, density: float) -> torch.Tensor:
    return _call(backend, "bsl_grad_input", (grad_y, weight, col_ptr, col_rows, bm, bk), density)


@_bsl_grad_input.register_fake
def _(grad_y, weight, col_ptr, col_rows, bm, bk, backend, density):
    return grad_y.new_empty(grad_y.shape[0], weight.shape[1])


@torch.library.custom_op("capsparse::bsl_grad_weight", mutates_args=())
def _bsl_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, block_rows: torch.Tensor, block_cols: torch.Tensor,
                     nnz: torch.Tensor, bm: int, bk: int, backend: str, density: float) -> torch.Tensor:
    return _call(backend, "bsl_grad_weight", (grad_y, x, block_rows, block_cols, nnz, bm, bk), density)


@_bsl_grad_weight.register_fake
def _(grad_y, x, block_rows, block_cols, nnz, bm, bk, backend, density):
    return x.new_empty(grad_y.shape[1], x.shape[1])


class BlockSparseLinearFunction(torch.autograd.Function):
    """Autograd for the block-sparse product on 2-D inputs; the backend is fixed before ``apply``."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, layout: BlockLayout, backend: str, density: float):
        bm, bk = layout.block_size
        ctx.save_for_backward(x2d, weight)
        ctx.layout, ctx.backend, ctx.has_bias, ctx.density = layout, backend, bias is not None, density
        return _bsl_forward(x2d, weight, bias, layout.row_ptr, layout.row_cols, bm, bk, backend, density)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight = ctx.saved_tensors
        layout, backend, density = ctx.layout, ctx.backend, ctx.density
        bm, bk = layout.block_size
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _bsl_grad_input(grad_y, weight, layout.col_ptr, layout.col_rows, bm, bk, backend, density)
        if ctx.needs_input_grad[1]:
            grad_w = _bsl_grad_weight(grad_y, x2d, layout.block_rows, layout.block_cols, layout.nnz, bm, bk,
                                      backend, density)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def block_sparse_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, layout: BlockLayout, backend: Optional[str] = None,
                             density: Optional[float] = None) -> torch.Tensor:
    """``grad_y^T @ x`` on the kept blocks of ``layout`` (exactly 0 elsewhere), outside autograd: the
    block-sparse dW on its own, for callers that need the product itself (movement pruning's block scores).

    ``grad_y``: ``(T, out_features)``, ``x``: ``(T, in_features)``; ``backend`` and ``density`` as in
    :func:`block_sparse_linear` (the backend is resolved here, so callers never import the backends).
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a capsparse.layout.BlockLayout, got {type(layout).__name__}")
    name = resolve_backend(x.device, backend, op="block_sparse_grad_weight")
    bm, bk = layout.block_size
    hint = -1.0 if density is None else float(density)
    return _bsl_grad_weight(grad_y.to(x.dtype).contiguous(), x.contiguous(), layout.block_rows, layout.block_cols,
                            layout.nnz, bm, bk, name, hint)


def block_sparse_linear(x: torch.Tensor, weight: torch.Tensor, layout: BlockLayout,
                        bias: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                        density: Optional[float] = None) -> torch.Tensor:
    """Block-sparse ``nn.functional.linear``.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)`` dense storage; only kept blocks are read.
        layout: :class:`~capsparse.layout.BlockLayout` of ``weight``.
        bias: optional ``(out_features,)``.
        backend: force ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (else
            ``CAPSPARSE_BACKEND`` or the device default).
        density: optional host-side kept fraction of ``layout`` (a hint: it picks dense or sparse
            kernels and launch configs, never the result).

    Returns:
        ``(..., out_features)``. The weight gradient is zero outside the kept blocks. Under
        ``torch.autocast`` the inputs are cast to the autocast dtype first (as ``F.linear`` does).
    """
    amp = autocast_dtype(x)
    x, weight, bias = cast(x, amp), cast(weight, amp), cast(bias, amp)
    check_linear_inputs(x, weight, bias)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a capsparse.layout.BlockLayout, got {type(layout).__name__}")
    check_weight(weight, layout.shape)
    if layout.device != weight.device:
        raise ValueError(f"layout: expected device {weight.device} (the weight's), got {layout.device}")
    if density is not None and not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a kept fraction in [0, 1] or None, got {density!r}")
    name = resolve_backend(x.device, backend, op="block_sparse_linear")
    with autocast_off(x.device):
        if name == "reference" and backend is None:
            # the reference op has exact autograd without the custom-op round trip
            return block_sparse_linear_reference(x, weight, layout, bias)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        hint = -1.0 if density is None else float(density)
        y = BlockSparseLinearFunction.apply(x2d, weight.contiguous(), bias, layout, name, hint)
    return y.reshape(*lead, weight.shape[0])
