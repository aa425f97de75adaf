"""Trainer callbacks defined on first use, so that importing their modules never imports transformers."""
from __future__ import annotations

from typing import Callable, Dict


def lazy_callbacks(module: str, **factories: Callable[[], type]) -> Callable[[str], type]:
    """A module ``__getattr__`` that builds each named class once, from its factory, when it is first asked for."""
    built: Dict[str, type] = {}

    def __getattr__(name: str) -> type:
        if name not in factories:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name not in built:
            cls = factories[name]()
            cls.__module__ = module
            built[name] = cls
        return built[name]

    return __getattr__
