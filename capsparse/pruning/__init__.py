"""Pruning criteria (magnitude, movement, soft movement, block movement, first-order structured), the cubic
schedule, and the one interface a training loop drives (:mod:`capsparse.pruning.method`). See ``docs/cap.md``."""
from .method import PruningMethod, SoftMovementPruning, StructuredPruning, TopKPruning
from .pruners import (BLOCK_SCORE_MODES, SCORE_ATTR, MagnitudePruner, MovementPruner, MovementScoreFunction, Pruner,
                      SoftMovementPruner, build_pruner)
from .schedule import CubicSchedule, cubic_threshold, cubic_value
from .structured import StructuredMasks, compact_model, prune_count, select_units

__all__ = ["PruningMethod", "TopKPruning", "SoftMovementPruning", "StructuredPruning",
           "Pruner", "MagnitudePruner", "MovementPruner", "SoftMovementPruner", "MovementScoreFunction",
           "build_pruner", "BLOCK_SCORE_MODES", "SCORE_ATTR", "CubicSchedule", "cubic_value", "cubic_threshold",
           "StructuredMasks", "compact_model", "select_units", "prune_count"]
