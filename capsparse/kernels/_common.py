"""Shared helpers for the Triton kernels: interpreter detection, argument checks, launch configs.

Configs are a table keyed by (GPU name, op, block size, density bucket). The H100 entries are
defaults chosen from the design notes (docs/triton.md), **not measured** on a GPU yet; other GPUs fall
back to them. Under ``TRITON_INTERPRET=1`` one small config is used so that CPU tests stay fast.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

# the layout's block sides (32/64/128 are the targets; 16 works: the tl.dot minimum)
from ..layout import SUPPORTED_BLOCK_SIZES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# argument checks: every error names the argument and the expected value
# ---------------------------------------------------------------------------------------------


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtype=None, dtypes=None, device=None,
                 shape: Optional[Tuple[int, ...]] = None, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")


def check_device_usable(name: str, t: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(f"{name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
                     f"got device {t.device}")


def check_block(name: str, value: int) -> None:
    if value not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name}: expected a block size in {SUPPORTED_BLOCK_SIZES}, got {value}")


def dot_flags(dtype: torch.dtype) -> Dict[str, object]:
    """Constexpr flags that control ``tl.dot`` numerics.

    * ``UPCAST``: multiply in fp32. Needed for bf16 under the interpreter (its bf16 ``tl.dot`` returns
      garbage); on GPU bf16/fp16 use tensor cores natively.
    * ``IN_PREC``: fp32 operands follow ``torch.get_float32_matmul_precision()`` as torch's own
      matmuls do: ``"highest"`` (torch's default) -> ``"ieee"``, so fp32 matches an fp32 reference;
      ``"high"`` / ``"medium"`` (the user allowed TF32) -> ``"tf32"`` tensor cores. The interpreter
      always computes in fp32.
    """
    upcast = dtype == torch.bfloat16 and interpreting()
    if interpreting() or upcast or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        prec = "ieee"
    else:
        prec = "tf32"  # only read by tl.dot for fp32 operands; fp16/bf16 ignore it
    return {"UPCAST": upcast, "IN_PREC": prec}


def launch_guard(t: torch.Tensor):
    """Context for a kernel launch on ``t``'s device: Triton launches on the *current* CUDA device,
    so on a multi-GPU machine tensors on ``cuda:1`` need ``torch.cuda.device(1)`` around the launch."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# launch configs
# ---------------------------------------------------------------------------------------------

# (op, block) -> (density bucket upper edge, config). First matching bucket wins.
# H100 defaults, not timed: 128 tokens per MMA tile (the token dimension is the large MMA dimension),
# 8 warps, 3-4 stages. Chosen so that ptxas reports no register spills when compiled for sm_90 and
# sm_80 (tests/test_triton_aot.py prints the table); fp32 operands use smaller token tiles (_FP32).
_H100_TABLE: Dict[Tuple[str, int], Tuple[Tuple[float, Dict[str, int]], ...]] = {}
for _b in SUPPORTED_BLOCK_SIZES:
    _inner = 32 if _b == 128 else _b  # K step of the MMA loop inside one block
    _t = 64 if _b == 128 else 128
    _H100_TABLE[("fwd", _b)] = ((1.01, {"BLOCK_T": _t, "BLOCK_K": _inner, "num_warps": 8, "num_stages": 4}),)
    _H100_TABLE[("dx", _b)] = ((1.01, {"BLOCK_T": _t, "BLOCK_K": _inner, "num_warps": 8, "num_stages": 4}),)
    # dW: more split-K when the layer is very sparse (few kept blocks -> few programs).
    _H100_TABLE[("dw", _b)] = (
        (0.15, {"BLOCK_T": 64, "TOKENS_PER_SPLIT": 512, "num_warps": 4 if _b <= 64 else 8, "num_stages": 4}),
        (1.01, {"BLOCK_T": 64, "TOKENS_PER_SPLIT": 2048, "num_warps": 4 if _b <= 64 else 8, "num_stages": 3}),
    )
# fp32 tiles hold twice the bytes (and sm_80 runs fp32 dots without MMA): (op, block) -> overrides
_FP32 = {("fwd", 64): {"BLOCK_T": 32}, ("dx", 64): {"BLOCK_T": 32}, ("fwd", 128): {"BLOCK_T": 32},
         ("dx", 128): {"BLOCK_T": 32}, ("dw", 32): {"BLOCK_T": 32, "num_warps": 8},
         ("dw", 64): {"BLOCK_T": 32, "num_warps": 8}, ("dw", 128): {"BLOCK_T": 16, "num_warps": 8}}

_TABLES: Dict[str, Dict] = {"NVIDIA H100": _H100_TABLE}
_TUNED: Dict[Tuple, Dict[str, int]] = {}

_INTERP_CONFIG = {"BLOCK_T": 32, "BLOCK_K": 32, "TOKENS_PER_SPLIT": 32, "num_warps": 1, "num_stages": 1}


def density_bucket(density: Optional[float]) -> float:
    """Round a density hint to 5% steps (autotune keys must not depend on the exact nnz)."""
    if density is None:
        return 1.0
    return min(1.0, max(0.0, round(float(density) * 20) / 20))


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    return torch.cuda.get_device_name(device)


def register_config(gpu: str, op: str, block: int, bucket: float, config: Dict[str, int]) -> None:
    """Store a tuned config (for example from a benchmark sweep); it wins over the default table.

    ``gpu`` is the exact ``torch.cuda.get_device_name()`` string (lookups use the exact name too; only
    the built-in default tables match by prefix).
    """
    if not isinstance(gpu, str) or not gpu:
        raise ValueError(f"gpu: expected the exact torch.cuda.get_device_name() string, got {gpu!r}")
    if op not in ("fwd", "dx", "dw"):
        raise ValueError(f"op: expected 'fwd', 'dx' or 'dw', got {op!r}")
    _TUNED[(gpu, op, block, density_bucket(bucket))] = dict(config)


def table_config(gpu: str, op: str, block: int, density: Optional[float] = None,
                 dtype: torch.dtype = torch.bfloat16) -> Dict[str, int]:
    """The GPU launch config for ``op`` on the GPU named ``gpu`` (no device needed: AOT checks use it)."""
    bucket = density_bucket(density)
    tuned = _TUNED.get((gpu, op, block, bucket))
    if tuned is not None:
        return dict(tuned)
    table = next((t for prefix, t in _TABLES.items() if gpu.startswith(prefix)), _H100_TABLE)
    cfg = next((c for edge, c in table[(op, block)] if bucket <= edge), table[(op, block)][-1][1])
    cfg = dict(cfg)
    if dtype == torch.float32:
        cfg.update(_FP32.get((op, block), {}))
    return cfg


def get_config(op: str, block: int, device: torch.device, density: Optional[float] = None,
               dtype: torch.dtype = torch.bfloat16) -> Dict[str, int]:
    """Launch config for ``op`` in {"fwd", "dx", "dw"} keyed by (GPU name, density bucket, fp32 or not)."""
    if interpreting() or device.type != "cuda":
        cfg = dict(_INTERP_CONFIG)
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], block)
        return cfg
    return table_config(gpu_name(device), op, block, density, dtype)


# ---------------------------------------------------------------------------------------------
# device-side helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def gelu_f32(x):
    """Exact (erf) GELU in fp32, as in BERT."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad_f32(x):
    """d GELU / dx in fp32."""
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf
