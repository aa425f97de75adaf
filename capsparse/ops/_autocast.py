"""Autocast for the custom ops, done the way ``torch.nn.functional.linear`` is under autocast.

Inside ``torch.autocast`` an op receives, e.g., a bf16 activation and an fp32 weight. Like torch's
linear, the op casts its floating inputs (fp64 excepted) to the autocast dtype before it dispatches,
and runs its body with autocast off so that the backend sees one dtype and nothing inside is recast.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(x):
    """The active autocast dtype for tensor ``x``'s device, or ``None`` when autocast is off there
    (or ``x`` is no tensor: the op's input checks then say so)."""
    if not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast(t, dtype):
    """``t`` in ``dtype`` when it is a floating tensor that autocast would cast (not fp64)."""
    if dtype is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() \
            or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def autocast_off(device: torch.device):
    """Context that disables autocast on ``device`` (a no-op when it is not enabled)."""
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
