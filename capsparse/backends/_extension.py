"""The compiled extensions, each imported at its first use: importing a backend module loads nothing."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


class LazyExtension:
    """``ext()``: the extension module ``name``, imported at the first call and kept. An ``ImportError`` (not
    built, or built against another torch) reaches the caller, and the next call tries again."""

    def __init__(self, name: str):
        self.name = name
        self.module: Optional[ModuleType] = None

    def __call__(self) -> ModuleType:
        if self.module is None:
            self.module = importlib.import_module(self.name)
        return self.module
