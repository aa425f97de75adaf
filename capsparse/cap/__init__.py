"""CAP: contrastive pruning (config, memory banks, objective, trainer). See ``docs/cap.md``.

``CAPTrainer`` imports transformers; it is loaded lazily (``capsparse.cap.CAPTrainer``).
"""
from __future__ import annotations

from ..distributed import shutdown_distributed
from .banks import BankSet, MemoryBank, encode_pass, estimate_bank_bytes
from .config import OFFICIAL_CODE, RECIPE_TRAINING, RECIPES, CAPConfig
from .losses import RepresentationTap, cap_objective, kd_loss

__all__ = ["CAPConfig", "RECIPES", "RECIPE_TRAINING", "OFFICIAL_CODE", "BankSet", "MemoryBank", "encode_pass",
           "estimate_bank_bytes", "shutdown_distributed", "RepresentationTap", "cap_objective", "kd_loss", "CAPTrainer",
           "prune_model"]


def __getattr__(name):
    if name in ("CAPTrainer", "prune_model"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'capsparse.cap' has no attribute {name!r}")
