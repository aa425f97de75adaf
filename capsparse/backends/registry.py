"""The one place where a backend is chosen, before autograd records anything.

Order of precedence: the ``backend=`` argument, then the ``CAPSPARSE_BACKEND`` environment
variable, then the default for the tensor's device (``cpu`` when the C++ extension is built,
else ``reference``; on CUDA ``triton``, else ``reference``). Forcing an unavailable backend is an
error that says why it is unavailable; the automatic choice falls back with one warning.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "CAPSPARSE_BACKEND"
_warned: set = set()


@lru_cache(maxsize=None)
def get_backend(name: str) -> ModuleType:
    """The backend module ``capsparse.backends.<name>`` (imported on first use)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return importlib.import_module(f"capsparse.backends.{name}")


_STATUS: Dict[str, Tuple[bool, str]] = {}


def backend_status(name: str) -> Tuple[bool, str]:
    """``(available, reason)``; cached, because availability does not change within a process."""
    if name not in _STATUS:
        _STATUS[name] = _probe(name)
    return _STATUS[name]


def _probe(name: str) -> Tuple[bool, str]:
    try:
        module = get_backend(name)
    except ImportError as exc:  # a backend whose module cannot even import is unavailable
        return False, f"capsparse.backends.{name} failed to import: {exc}"
    return module.is_available()


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend."""
    return {name: backend_status(name) for name in BACKENDS}


def _device_default(device_type: str) -> str:
    if device_type == "cuda":
        return "triton"
    if device_type == "cpu":
        return "cpu"
    return "reference"


def resolve_backend(device: torch.device, backend: Optional[str] = None, op: str = "op") -> str:
    """Name of the backend that runs ``op`` on ``device``.

    Args:
        device: device of the op's inputs.
        backend: forced backend name, or ``None`` for the environment variable / default.

    Under ``torch.compile`` the same rules run once at trace time (the probe cannot be traced, so
    its answer enters the graph as a constant), so a compiled graph runs the backend eager would.
    """
    if torch.compiler.is_compiling():
        return _resolve_at_trace_time(device.type, backend, op)
    return _resolve(device.type, backend, op)


def _resolve_at_trace_time(device_type: str, backend: Optional[str], op: str) -> str:
    return _resolve(device_type, backend, op)


# torch.compiler.assume_constant_result(_resolve_at_trace_time), which is exactly this attribute, but
# calling it imports torch._dynamo (and triton) with capsparse; tests/test_compile.py checks it works.
_resolve_at_trace_time._dynamo_marked_constant = True


def _resolve(device_type: str, backend: Optional[str], op: str) -> str:
    forced = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if forced is not None:
        if forced not in BACKENDS:
            source = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{source}: expected one of {BACKENDS}, got {forced!r}")
        ok, reason = backend_status(forced)
        if not ok:
            raise RuntimeError(f"backend {forced!r} was requested for {op} but is unavailable: {reason}")
        _check_device(forced, device_type)
        return forced
    choice = _device_default(device_type)
    if choice != "reference":
        ok, reason = backend_status(choice)
        if not ok:
            if choice not in _warned:
                _warned.add(choice)
                warnings.warn(f"capsparse: backend {choice!r} unavailable ({reason}); using 'reference'",
                              RuntimeWarning, stacklevel=4)
            choice = "reference"
    return choice


def _check_device(name: str, device_type: str) -> None:
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"backend: 'cpu' runs on CPU tensors only, got tensors on {device_type}")
    if name == "cuda" and device_type != "cuda":
        raise ValueError(f"backend: 'cuda' runs on CUDA tensors only, got tensors on {device_type}")
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device_type}")
