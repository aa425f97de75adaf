"""Input validation shared by the ops: errors name the argument, the value and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, dims=None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in (dims if isinstance(dims, tuple) else (dims,)):
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {value.dtype}")


def check_linear_inputs(x, weight, bias) -> None:
    check_tensor("weight", weight, dims=2)
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (weight.shape[1]), got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x: expected device {weight.device} (the weight's), got {x.device}")
    if bias is not None:
        check_tensor("bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != weight.device or bias.dtype != weight.dtype:
            raise ValueError(f"bias: expected {weight.dtype} on {weight.device}, got {bias.dtype} on {bias.device}")
