"""Block-sparse linear: ``y = x (W * expand(bitmap))^T + b`` with forward, dX and dW on kept blocks.

Chain: backend primitive (``capsparse.backends.<name>.bsl_*``) -> ``torch.library`` custom ops
``capsparse::bsl_forward / bsl_grad_input / bsl_grad_weight / bsl_grad_weight_blocks / bsl_grad_bias`` (with fake
implementations, so ``torch.compile`` traces them) -> :class:`BlockSparseLinearFunction` -> :func:`block_sparse_linear`.
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
from .masked_linear import _needs_graph, _plain_eager


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


@torch.library.custom_op("capsparse::bsl_grad_weight_blocks", mutates_args=())
def _bsl_grad_weight_blocks(grad_y: torch.Tensor, x: torch.Tensor, block_rows: torch.Tensor,
                            block_cols: torch.Tensor, nnz: torch.Tensor, bm: int, bk: int, backend: str,
                            density: float) -> torch.Tensor:
    args = (grad_y, x, block_rows, block_cols, nnz, bm, bk)
    if hasattr(get_backend(backend), "bsl_grad_weight_blocks"):
        return _call(backend, "bsl_grad_weight_blocks", args, density)
    # backends without a compact kernel: their dense dW, then the kept blocks (syncs once for nnz)
    n, k = grad_y.shape[1], x.shape[1]
    rows, cols = block_rows[:int(nnz)].to(torch.int64), block_cols[:int(nnz)].to(torch.int64)
    return _call(backend, "bsl_grad_weight", args, density).reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)[
        rows, cols].contiguous()


@torch.library.custom_op("capsparse::bsl_grad_bias", mutates_args=())
def _bsl_grad_bias(grad_y: torch.Tensor, backend: str) -> torch.Tensor:
    module = get_backend(backend)
    if hasattr(module, "bsl_grad_bias"):
        return module.bsl_grad_bias(grad_y)
    return grad_y.sum(0)


@_bsl_grad_bias.register_fake
def _(grad_y, backend):
    return grad_y.new_empty(grad_y.shape[1])


@_bsl_grad_weight_blocks.register_fake
def _(grad_y, x, block_rows, block_cols, nnz, bm, bk, backend, density):
    return x.new_empty(torch.library.get_ctx().new_dynamic_size(), bm, bk)


def _block_index(layout: BlockLayout, count: int):
    return layout.block_rows[:count].to(torch.int64), layout.block_cols[:count].to(torch.int64)


def _block_view(t: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``[N, K]`` as ``[R, C, bm, bk]`` (a view: writes reach ``t``)."""
    (r, c), (bm, bk) = layout.grid, layout.block_size
    return t.view(r, bm, c, bk).permute(0, 2, 1, 3)


def scatter_blocks(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Dense ``[N, K]`` from the kept blocks ``[nnz, bm, bk]`` (in ``layout``'s block order), zeros elsewhere."""
    out = blocks.new_zeros(layout.shape)
    _block_view(out, layout)[_block_index(layout, blocks.shape[0])] = blocks
    return out


def kept_block_sums(blocks: torch.Tensor, weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """fp32 ``[R, C]``: ``sum(blocks[q] * W's block q)`` at each kept block, 0 at pruned blocks."""
    index = _block_index(layout, blocks.shape[0])
    sums = (blocks.float() * _block_view(weight.detach(), layout)[index].float()).sum(dim=(1, 2))
    grid = sums.new_zeros(layout.grid)
    grid[index] = sums
    return grid


class GradWeightOffer:
    """The weight gradient of one block-sparse product, handed over by a consumer of its output whose
    backward runs first and forms the same product (movement scores), so that it is not formed twice.

    It is taken only by the backward that receives exactly the gradient the consumer saw (same memory,
    same version): if anything else adds to the output's gradient, the product is formed again.
    """
    __slots__ = ("key", "blocks", "dense")

    def __init__(self):
        self.key = self.blocks = self.dense = None

    @staticmethod
    def _key(grad: torch.Tensor):
        return (grad.data_ptr(), grad._version, grad.numel()) if grad.is_contiguous() else None

    def give(self, grad_output: torch.Tensor, blocks: Optional[torch.Tensor] = None,
             dense: Optional[torch.Tensor] = None) -> None:
        """``blocks``: the kept-block ``grad_y^T x`` ``[nnz, bm, bk]``; or ``dense``: the whole ``[N, K]`` product.
        Ownership passes to the taker (it may modify them): the giver must not read them afterwards."""
        self.key, self.blocks, self.dense = self._key(grad_output), blocks, dense

    def take(self, grad_y: torch.Tensor):
        key, blocks, dense = self.key, self.blocks, self.dense
        self.key = self.blocks = self.dense = None
        if key is None or key != self._key(grad_y):
            return None, None
        return blocks, dense


_OFFER_ATTR = "_capsparse_grad_weight_offer"


def grad_weight_offer(output: torch.Tensor) -> Optional[GradWeightOffer]:
    """The :class:`GradWeightOffer` of a :func:`block_sparse_linear` output (``None`` for other tensors)."""
    return getattr(output, _OFFER_ATTR, None)


class BlockSparseLinearFunction(torch.autograd.Function):
    """Autograd for the block-sparse product on 2-D inputs; the backend is fixed before ``apply``."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, layout: BlockLayout, backend: str, density: float,
                offer: Optional[GradWeightOffer] = None):
        bm, bk = layout.block_size
        ctx.save_for_backward(x2d, weight)
        ctx.layout, ctx.backend, ctx.has_bias, ctx.density = layout, backend, bias is not None, density
        ctx.offer = offer
        return _bsl_forward(x2d, weight, bias, layout.row_ptr, layout.row_cols, bm, bk, backend, density)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight = ctx.saved_tensors
        layout, backend, density = ctx.layout, ctx.backend, ctx.density
        bm, bk = layout.block_size
        blocks, dense = ctx.offer.take(grad_y) if ctx.offer is not None else (None, None)
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _bsl_grad_input(grad_y, weight, layout.col_ptr, layout.col_rows, bm, bk, backend, density)
        if ctx.needs_input_grad[1]:
            if blocks is not None:
                grad_w = scatter_blocks(blocks.to(weight.dtype), layout)
            elif dense is not None:
                # the offered product is handed over (nobody reads it after the offer): masked in place
                grad_w = dense.to(weight.dtype).contiguous()
                _block_view(grad_w, layout).masked_fill_(~layout.bitmap[:, :, None, None], 0)
            else:
                grad_w = _bsl_grad_weight(grad_y, x2d, layout.block_rows, layout.block_cols, layout.nnz, bm, bk,
                                          backend, density)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _bsl_grad_bias(grad_y, backend)
        return grad_x, grad_w, grad_b, None, None, None, None


def block_sparse_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, layout: BlockLayout, backend: Optional[str] = None,
                             density: Optional[float] = None, compact: bool = False) -> torch.Tensor:
    """``grad_y^T @ x`` on the kept blocks of ``layout`` (exactly 0 elsewhere), outside autograd: the
    block-sparse dW on its own, for callers that need the product itself (movement pruning's block scores).

    ``grad_y``: ``(T, out_features)``, ``x``: ``(T, in_features)``; ``backend`` and ``density`` as in
    :func:`block_sparse_linear` (the backend is resolved here, so callers never import the backends).
    ``compact=True``: only the kept blocks, ``[nnz, bm, bk]`` in the layout's block order (no zero-filled
    ``[N, K]`` matrix; :func:`scatter_blocks` expands it).
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a capsparse.layout.BlockLayout, got {type(layout).__name__}")
    name = resolve_backend(x.device, backend, op="block_sparse_grad_weight")
    bm, bk = layout.block_size
    hint = -1.0 if density is None else float(density)
    op = _bsl_grad_weight_blocks if compact else _bsl_grad_weight
    return op(grad_y.to(x.dtype).contiguous(), x.contiguous(), layout.block_rows, layout.block_cols, layout.nnz, bm,
              bk, name, hint)


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
        if not _needs_graph(x, weight, bias):  # inference: the forward alone (no autograd node)
            bm, bk = layout.block_size
            args = (x2d, weight.contiguous(), bias, layout.row_ptr, layout.row_cols, bm, bk)
            # eager: the op's implementation directly; under a tracer, mode or profiler: the registered op
            y = _call(name, "bsl_forward", args, hint) if _plain_eager(*args[:5]) else _bsl_forward(*args, name, hint)
            return y.reshape(*lead, weight.shape[0])
        # (not under torch.compile: the hand-over is a Python attribute on the output)
        offer = (GradWeightOffer() if torch.is_grad_enabled() and weight.requires_grad
                 and not torch.compiler.is_compiling() else None)
        y = BlockSparseLinearFunction.apply(x2d, weight.contiguous(), bias, layout, name, hint, offer)
    y = y.reshape(*lead, weight.shape[0])
    if offer is not None:
        setattr(y, _OFFER_ATTR, offer)
    return y
