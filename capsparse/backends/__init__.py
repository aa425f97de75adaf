"""Backends implementing the primitives of ``docs/design.md``: reference, cpu, triton, cuda.

Backend modules are imported lazily by :mod:`capsparse.backends.registry`; importing this package
compiles nothing and touches no GPU.
"""
from .registry import BACKENDS, available_backends, get_backend, resolve_backend

__all__ = ["BACKENDS", "available_backends", "get_backend", "resolve_backend"]
