"""Dropout whose mask is a pure function of a seed: element ``i`` (row-major) is kept when word ``i % 4`` of
Philox4x32-10 at counter ``i // 4`` under the 64-bit key ``seed`` is below ``(1 - p) * 2**32``; kept elements are
scaled by ``1 / (1 - p)``.

Each call draws the seed (an int64 scalar tensor) from torch's default CPU generator, so ``torch.manual_seed`` and
a restored RNG state reproduce the masks. The backward regenerates the mask from the seed, so nothing mask-sized is saved.
:func:`dropout_reference` computes the same words with plain integer tensor ops (bitwise the same mask as the
``cpu`` kernel); on CUDA the op is ``F.dropout`` (torch's fused kernel is already fast there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import reference as _reference
from ..backends.registry import get_backend, resolve_backend
from ._checks import check_tensor


def dropout_reference(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch oracle of the ``cpu`` kernel, ``0 < p < 1``: the same mask, the same scale."""
    return _reference.dropout(x, p, seed)


@torch.library.custom_op("capsparse::dropout", mutates_args=())
def _dropout(x: torch.Tensor, p: float, seed: torch.Tensor, backend: str) -> torch.Tensor:
    return get_backend(backend).dropout(x, p, seed)


@_dropout.register_fake
def _(x, p, seed, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class DropoutFunction(torch.autograd.Function):
    """The gradient is the same masked scaling of ``grad``, regenerated from the seed."""

    @staticmethod
    def forward(ctx, x, p: float, seed: torch.Tensor, backend: str):
        ctx.save_for_backward(seed)
        ctx.p, ctx.backend = p, backend
        return _dropout(x, p, seed, backend)

    @staticmethod
    def backward(ctx, grad):
        seed, = ctx.saved_tensors
        return _dropout(grad, ctx.p, seed, ctx.backend), None, None, None


def check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a dropout probability in [0, 1], got {p!r}")
    return float(p)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, backend=None) -> torch.Tensor:
    """``F.dropout`` with a seed-determined mask (module docstring). ``p = 0`` or ``training=False`` returns ``x``
    itself and ``p = 1`` zeros, as ``F.dropout`` does; neither draws from the generator."""
    p = check_p(p)
    check_tensor("x", x)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    name = resolve_backend(x.device, backend, op="dropout")
    if name not in ("cpu", "reference"):
        return F.dropout(x, p, True)
    # a tensor, not an int: no host sync, and torch.compile traces the draw
    seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64)
    return DropoutFunction.apply(x, p, seed, name)
