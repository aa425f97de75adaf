"""capsparse: fast, faithful high-sparsity pruning of BERT-class models (CAP, Xu et al. 2022).

Importing capsparse imports torch only: no compiled extension is loaded, no GPU is touched and
transformers is imported on first use of the parts that need it.
"""
from __future__ import annotations

import importlib

from . import layout, nn, ops
from .layout import BlockLayout, ElementMask
from .nn import SparseLinear
from .surgery import BERT_ENCODER_TARGETS, densify, sparse_layers, sparsify

__version__ = "0.1.0"

_LAZY = {
    "models": ("capsparse.models", None),
    "load_default": ("capsparse.models", "load_default"),
    "backends": ("capsparse.backends", None),
    "pruning": ("capsparse.pruning", None),
    "cap": ("capsparse.cap", None),
    "data": ("capsparse.data", None),
    "CAPTrainer": ("capsparse.cap.trainer", "CAPTrainer"),
    "CAPConfig": ("capsparse.cap.config", "CAPConfig"),
    "load_compressed": ("capsparse.export", "load_compressed"),
    "export_compressed": ("capsparse.export", "export_compressed"),
    "from_pretrained": ("capsparse.pretrained", "from_pretrained"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'capsparse' has no attribute {name!r}")


__all__ = ["BlockLayout", "ElementMask", "SparseLinear", "sparsify", "densify", "sparse_layers",
           "BERT_ENCODER_TARGETS", "layout", "nn", "ops", *_LAZY]
