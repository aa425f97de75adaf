"""Pruning criteria (magnitude, movement, soft movement, block movement, first-order structured) and the
cubic sparsity schedule. See ``docs/cap.md``."""
from .pruners import (BLOCK_SCORE_MODES, SCORE_ATTR, MagnitudePruner, MovementPruner, MovementScoreFunction, Pruner,
                      SoftMovementPruner, build_pruner)
from .schedule import CubicSchedule, cubic_threshold
from .structured import StructuredMasks, compact_model, prune_count, select_units

__all__ = ["Pruner", "MagnitudePruner", "MovementPruner", "SoftMovementPruner", "MovementScoreFunction",
           "build_pruner", "BLOCK_SCORE_MODES", "SCORE_ATTR", "CubicSchedule", "cubic_threshold",
           "StructuredMasks", "compact_model", "select_units", "prune_count"]
