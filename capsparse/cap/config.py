"""``CAPConfig``: every knob of a CAP run, with the published recipes (``docs/cap.md``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..layout import check_sparsity, normalize_block_size
from ..ops.contrastive import NORMALIZATIONS
from ..pruning.pruners import BLOCK_SCORE_MODES, SCORE_CRITERIA, SCORE_INIT_MODES
from ..pruning.schedule import SCHEDULE_UNITS
from .query_head import QUERY_HEADS
from .score_objective import SCORE_OBJECTIVES

METHODS = ("magnitude", "movement", "soft-movement", "block-movement", "first-order")
SCORELESS_METHODS = ("magnitude", "first-order")  # no movement scores to learn or rank
REPRESENTATIONS = ("pooler", "cls", "mean")
BANK_NAMES = ("prc", "snc", "fic")
BANK_DTYPES = ("float32", "float16", "bfloat16")
SNAPSHOT_MODES = ("train", "eval")
CONTRASTIVE_PHASES = ("all", "pruning")  # contrastive terms on every step, or until the final mask


@dataclass
class CAPConfig:
    """Configuration of a CAP pruning run. Defaults follow the official unstructured GLUE script (CAP-m) except where
    docs/cap.md lists a departure.

    Pruning:
        method: "magnitude" | "movement" (CAP-m) | "soft-movement" (CAP-soft) | "block-movement" |
            "first-order" (CAP-f).
        target_sparsity: final fraction of encoder-linear weights removed, in [0, 1). Soft movement does
            not set it directly (lambda does); it is then only the reference for the report.
        block_size: block side for "block-movement" (default 32), ``None`` otherwise.
        block_score_mode: "exact" (dense dW' for the block scores, as nn_pruning), "fast" (kept blocks only,
            pruned blocks frozen) or "sampled" (kept blocks exact, pruned blocks an unbiased estimate from 1/8
            of the tokens).
        magnitude_scope: "local" (per matrix, official) or "global".
        score_lr: the score optimizer group's learning rate (no weight decay).
        score_init_mode, score_init, score_init_scale: how movement scores start. "magnitude" (default): at
            ``score_init + score_init_scale * z``, ``z`` the per-matrix standardised ``|W|`` (per-block sums for
            block scores), so the first masks are magnitude's and movement takes over where its evidence is
            consistent; "constant": every score at ``score_init`` (the official code: 0.0).
        score_criterion: what ranks the units of "movement" / "block-movement": "learned" (default; scores trained
            by the score optimizer, official movement pruning) or "saliency" (not learned: an EMA of
            ``|dL/dW' * W|`` times its uncertainty, as PLATON, with ``saliency_betas``; ``score_init*`` and
            ``score_lr`` are then unused, and changing them from their defaults is an error, as is changing
            ``saliency_betas`` with learned scores or any score knob with magnitude / first-order).
        score_objective: what the movement scores learn from: "full" (default; the whole objective, official) or
            "task" (CE + KD + L1 only: the contrastive terms train the weights but not the scores; one extra
            backward per step).
        freeze_embeddings: keep the embedding layer fixed while pruning; ``None`` (default): on for the
            unstructured and block methods (as the official unstructured code), off for "first-order".
        fast_dropout: when the trainer swaps the encoder linears for SparseLinear (unstructured and block methods),
            also swap dropout and sdpa self-attention for capsparse's seed-determined dropout (``sparsify(...,
            dropout=True)``: same distribution, other draws, about 10x faster on CPU); False keeps torch's
            dropout, as runs before 2026-12-02. A model sparsified before the trainer keeps what it has.
        soft_lambda_final, soft_final_threshold, soft_min_keep: CAP-soft's L1 weight at the end, sigmoid threshold
            at the end (0 -> 0.1), and minimum fraction kept per matrix.
        schedule_warmup, schedule_unit, initial_warmup, final_warmup: the cubic schedule's unit ``w`` (in
            "steps", "epochs" or a "fraction" of training) and its warm-up / cool-down multipliers.
        structured_steps, epochs_per_step, structured_warmup_ratio, heads_protected, importance_batches:
            CAP-f: number of cumulative pruning steps (10%..90% for 9 and a 0.9 target), re-training epochs per step,
            LR warm-up ratio within each step, active heads protected per layer, and a cap on the batches of the
            importance pass (``None`` = the whole training set, as official).
        importance_batch_size: batch size of CAP-f's importance pass (``None``: the training batch size, as
            the official code).
        sparsity_tolerance: allowed |reached - target| at the end of training (RuntimeError beyond it).
        nan_policy: non-finite loss or gradients: "skip" the optimizer step (raises after 20 in a row) or "stop"
            with an error naming the parameter and the step (see docs/reliability.md).
    Contrastive (CAP):
        use_cap: add the contrastive modules (False: CE + KD only).
        banks: which of "prc", "snc", "fic" are on.
        temperature, w_u, w_s, w_ce, w_kd, kd_temperature, normalization ("official" | "supcon").
        w_hidden: weight of layer-wise hidden-state distillation, ``w_hidden * mean_l MSE(h_S^l, h_T^l)`` over the
            real tokens of every encoder layer's output (TinyBERT / CoFi's layer distillation; student and teacher
            share the hidden size, so no projection). It needs a no-grad teacher forward per training step.
            0.0 (default, every recipe): off, as the official code. Measured on SST-2 at 90% (docs/results.md,
            eighth set): 5.0 helps plain movement (+0.65 points, 3 seeds) but not CAP-m (-0.11).
        w_attention: weight of attention-distribution distillation, ``w_attention * mean_l KL(A_T^l || A_S^l)``
            over the heads and real query tokens of every encoder layer, ``A = softmax(q k^T / sqrt(d))`` from the
            query and key projections (TinyBERT's and MiniLM's self-attention transfer). It keeps the pattern of
            which token reads which, which a pruned student's attention loses first (its rows drift towards
            uniform). It needs a no-grad teacher forward per training step. 0.0 (default, every recipe): off.
        n_extra_keys: extra random keys per bank per step (``floor(n / R)`` examples with their R vectors).
        representation: "cls" (default: the last encoder layer's ``[CLS]`` vector; measured better than the
            pooler at short budgets, docs/results.md), "pooler" (official GLUE; the query after the classifier
            dropout), "mean".
        query_head: what the query passes through before the contrastive loss: "none" (default, official: the
            representation itself) or "linear" (a trainable linear map starting at the identity, as CRD's embedding
            head; training-only, in ``cap_state.pt``, never exported; clipped at ``max_grad_norm`` on its own).
        contrastive_phase: when the contrastive terms apply: "all" (default; every step, official) or "pruning"
            (until the cubic schedule reaches its final mask; the final-mask steps train on CE + KD only and take
            no more snapshots). Methods with a cubic schedule only (not "first-order").
        bank_dtype, bank_device ("auto": the model's accelerator when the banks fit, else (pinned) CPU; or a
            device string), max_snapshots (SnC capacity R_max; ``None``: from the schedule), snapshot_mode
            ("train": dropout on while encoding snapshots, as the official unstructured code; "eval").
        encode_batch_size: batch size of the no-grad encoding passes (``None``: per_device_eval_batch_size).
        regression_bins: for regression tasks with ``w_s > 0``: bin the targets into this many quantile bins for
            supervised positives; ``None`` refuses (supervised positives need classes).
    Teacher:
        teacher_epochs: epochs of dense fine-tuning when no teacher is given.
    """

    method: str = "movement"
    target_sparsity: float = 0.9
    block_size: Optional[int] = None
    block_score_mode: str = "exact"
    magnitude_scope: str = "local"
    score_lr: float = 1e-2
    score_init_mode: str = "magnitude"
    score_init: float = 0.0
    score_init_scale: float = 1.0
    score_criterion: str = "learned"
    saliency_betas: Tuple[float, float] = (0.85, 0.95)
    score_objective: str = "full"
    freeze_embeddings: Optional[bool] = None
    fast_dropout: bool = True
    soft_lambda_final: float = 190.0
    soft_final_threshold: float = 0.1
    soft_min_keep: float = 0.005
    schedule_warmup: float = 11000
    schedule_unit: str = "steps"
    initial_warmup: float = 2.0
    final_warmup: float = 3.0
    structured_steps: int = 9
    epochs_per_step: float = 2.0
    structured_warmup_ratio: float = 0.1
    heads_protected: int = 1
    importance_batches: Optional[int] = None
    importance_batch_size: Optional[int] = None
    sparsity_tolerance: float = 0.01
    nan_policy: str = "skip"
    use_cap: bool = True
    banks: Tuple[str, ...] = BANK_NAMES
    temperature: float = 0.1
    w_u: float = 0.1
    w_s: float = 10.0
    w_ce: float = 0.1
    w_kd: float = 0.9
    kd_temperature: float = 2.0
    w_hidden: float = 0.0
    w_attention: float = 0.0
    normalization: str = "official"
    n_extra_keys: int = 4096
    representation: str = "cls"
    query_head: str = "none"
    contrastive_phase: str = "all"
    bank_dtype: str = "float32"
    bank_device: str = "auto"
    max_snapshots: Optional[int] = None
    snapshot_mode: str = "train"
    encode_batch_size: Optional[int] = None
    regression_bins: Optional[int] = None
    teacher_epochs: float = 3.0

    def __post_init__(self):
        self.banks = tuple(self.banks)
        if self.method == "block-movement" and self.block_size is None:
            self.block_size = 32
        self.validate()

    def validate(self) -> None:
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}: expected one of {options}, got {getattr(self, name)!r}")

        choice("method", METHODS)
        choice("normalization", NORMALIZATIONS)
        choice("representation", REPRESENTATIONS)
        choice("bank_dtype", BANK_DTYPES)
        choice("snapshot_mode", SNAPSHOT_MODES)
        choice("schedule_unit", SCHEDULE_UNITS)
        choice("block_score_mode", BLOCK_SCORE_MODES)
        choice("score_init_mode", SCORE_INIT_MODES)
        choice("score_criterion", SCORE_CRITERIA)
        choice("score_objective", SCORE_OBJECTIVES)
        choice("contrastive_phase", CONTRASTIVE_PHASES)
        choice("query_head", QUERY_HEADS)
        if self.query_head != "none" and not self.use_cap:
            raise ValueError(f"query_head: {self.query_head!r} maps the contrastive query, but use_cap=False has no "
                             f"contrastive terms; expected 'none'")
        if self.contrastive_phase == "pruning" and (self.method == "first-order" or not self.use_cap):
            raise ValueError(f"contrastive_phase: 'pruning' ends the contrastive terms at the cubic schedule's final "
                             f"mask, but method={self.method!r} with use_cap={self.use_cap} has "
                             f"{'no contrastive terms' if not self.use_cap else 'no cubic schedule'}; expected 'all'")
        if self.score_objective == "task" and (self.method in SCORELESS_METHODS or not self.use_cap):
            raise ValueError(f"score_objective: 'task' keeps the contrastive terms' gradient out of movement scores, "
                             f"but method={self.method!r} with use_cap={self.use_cap} has "
                             f"{'no contrastive terms' if not self.use_cap else 'no movement scores'}; expected "
                             f"'full' here")
        if self.score_criterion == "saliency" and self.method not in ("movement", "block-movement"):
            raise ValueError(f"score_criterion: 'saliency' ranks the units of 'movement' and 'block-movement', got "
                             f"method {self.method!r} (soft movement needs learned scores for its sigmoid threshold)")
        betas = tuple(self.saliency_betas) if isinstance(self.saliency_betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"saliency_betas: expected two numbers in [0, 1), got {self.saliency_betas!r}")
        self.saliency_betas = tuple(float(b) for b in betas)
        if not (isinstance(self.score_init_scale, (int, float)) and self.score_init_scale > 0):
            raise ValueError(f"score_init_scale: expected a number > 0, got {self.score_init_scale!r}")
        self._refuse_unused_score_knobs()
        if not isinstance(self.fast_dropout, bool):
            raise ValueError(f"fast_dropout: expected True or False, got {self.fast_dropout!r}")
        if self.freeze_embeddings not in (None, True, False):
            raise ValueError(f"freeze_embeddings: expected None, True or False, got {self.freeze_embeddings!r}")
        if self.importance_batch_size is not None and (not isinstance(self.importance_batch_size, int)
                                                       or self.importance_batch_size < 1):
            raise ValueError(f"importance_batch_size: expected None or an int >= 1, got "
                             f"{self.importance_batch_size!r}")
        choice("magnitude_scope", ("local", "global"))
        check_sparsity(self.target_sparsity, "target_sparsity")
        unknown = [b for b in self.banks if b not in BANK_NAMES]
        if unknown:
            raise ValueError(f"banks: expected a subset of {BANK_NAMES}, got {self.banks!r}")
        if self.block_size is not None:
            normalize_block_size(self.block_size)
            if self.method not in ("block-movement", "magnitude"):
                raise ValueError(f"block_size: only 'block-movement' and 'magnitude' use block layouts, got "
                                 f"block_size={self.block_size} with method {self.method!r}")
        for name in ("temperature", "kd_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("w_u", "w_s", "w_ce", "w_kd", "w_hidden", "w_attention", "score_lr", "soft_lambda_final",
                     "sparsity_tolerance", "teacher_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if self.w_attention > 0 and self.method == "first-order":
            raise ValueError(f"w_attention: {self.w_attention!r} compares student and teacher attention head by head, "
                             f"but 'first-order' removes heads; use w_attention=0 with it")
        if self.nan_policy not in ("skip", "stop"):
            raise ValueError(f"nan_policy: expected 'skip' or 'stop', got {self.nan_policy!r}")
        if not isinstance(self.n_extra_keys, int) or self.n_extra_keys < 0:
            raise ValueError(f"n_extra_keys: expected an int >= 0, got {self.n_extra_keys!r}")
        if not isinstance(self.structured_steps, int) or self.structured_steps < 1:
            raise ValueError(f"structured_steps: expected an int >= 1, got {self.structured_steps!r}")
        if self.max_snapshots is not None and (not isinstance(self.max_snapshots, int) or self.max_snapshots < 1):
            raise ValueError(f"max_snapshots: expected None or an int >= 1, got {self.max_snapshots!r}")
        if self.regression_bins is not None and (not isinstance(self.regression_bins, int) or self.regression_bins < 2):
            raise ValueError(f"regression_bins: expected None or an int >= 2, got {self.regression_bins!r}")
        if not 0 < self.soft_final_threshold < 1:
            raise ValueError(f"soft_final_threshold: expected a number in (0, 1), got {self.soft_final_threshold!r}")

    def _refuse_unused_score_knobs(self) -> None:
        """A score knob changed from its default where nothing reads it is an error, not silently ignored."""
        learned = ("score_lr", "score_init_mode", "score_init", "score_init_scale")
        if self.method in SCORELESS_METHODS:
            unused, why = learned + ("saliency_betas",), f"method {self.method!r} has no movement scores"
        elif self.score_criterion == "saliency":
            unused, why = learned, "score_criterion='saliency' does not learn its scores"
        else:
            unused, why = ("saliency_betas",), "score_criterion='learned' keeps no saliency averages"
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in unused:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"{name}: set to {getattr(self, name)!r}, but {why}; expected the default "
                                 f"{defaults[name]!r}")

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def structured(self) -> bool:
        return self.method == "first-order"

    @property
    def embeddings_frozen(self) -> bool:
        """Whether the embeddings stay fixed: ``freeze_embeddings``, or by method when it is ``None``."""
        return (not self.structured) if self.freeze_embeddings is None else bool(self.freeze_embeddings)

    @property
    def active_banks(self) -> Tuple[str, ...]:
        return self.banks if self.use_cap else ()

    @property
    def needs_teacher(self) -> bool:
        """Whether a run reads a teacher: KD, layer-wise or attention distillation, or the FiC bank."""
        return self.w_kd > 0 or self.w_hidden > 0 or self.w_attention > 0 or "fic" in self.active_banks

    # -- recipes -----------------------------------------------------------------------------------------
    @classmethod
    def recipe(cls, name: str, official: bool = False, **overrides) -> "CAPConfig":
        """The published defaults (``docs/cap.md``): "glue-unstructured", "glue-structured",
        "squad-unstructured", "squad-structured". ``official=True`` also undoes capsparse's departures from the
        official code that have a field (:data:`OFFICIAL_CODE`: zero-start movement scores, the pooler query).
        ``overrides`` replace fields."""
        if name not in RECIPES:
            raise ValueError(f"recipe: expected one of {tuple(RECIPES)}, got {name!r}")
        if not isinstance(official, bool):
            raise ValueError(f"official: expected True or False, got {official!r}")
        values = dict(RECIPES[name])
        if official:
            values.update(OFFICIAL_CODE[name])
        values.update(overrides)
        return cls(**values)

    # -- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["banks"] = list(self.banks)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "CAPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"CAPConfig: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**values)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "CAPConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __str__(self) -> str:
        lines = [f"CAPConfig(method={self.method!r}, target_sparsity={self.target_sparsity})"]
        for f in dataclasses.fields(self):
            lines.append(f"  {f.name:<24} = {getattr(self, f.name)!r}")
        return "\n".join(lines)


# Published defaults (docs/cap.md, Recipes). The matching TrainingArguments are in RECIPE_TRAINING.
RECIPES = {
    "glue-unstructured": dict(method="movement", target_sparsity=0.9, temperature=0.1, w_u=0.1, w_s=10.0, w_ce=0.1,
                              w_kd=0.9, kd_temperature=2.0, representation="cls", schedule_warmup=11000,
                              schedule_unit="steps", initial_warmup=2, final_warmup=3, score_lr=1e-2,
                              snapshot_mode="train", n_extra_keys=4096),
    "glue-structured": dict(method="first-order", target_sparsity=0.9, structured_steps=9, epochs_per_step=2.0,
                            structured_warmup_ratio=0.1, heads_protected=1, temperature=0.1, w_u=0.3, w_s=3.0,
                            w_ce=0.1, w_kd=0.9, kd_temperature=1.0, representation="pooler", snapshot_mode="eval",
                            n_extra_keys=4096),
    "squad-unstructured": dict(method="movement", target_sparsity=0.9, temperature=0.1, w_u=0.5, w_s=0.0, w_ce=0.1,
                               w_kd=0.9, kd_temperature=2.0, representation="cls", schedule_warmup=5400,
                               schedule_unit="steps", initial_warmup=1, final_warmup=2, score_lr=1e-2,
                               snapshot_mode="train", n_extra_keys=4096),
    "squad-structured": dict(method="first-order", target_sparsity=0.9, structured_steps=9, epochs_per_step=2.0,
                             structured_warmup_ratio=0.1, heads_protected=1, temperature=0.3, w_u=0.3, w_s=0.0,
                             w_ce=0.1, w_kd=0.9, kd_temperature=1.0, representation="cls", snapshot_mode="eval",
                             n_extra_keys=4096),
}

# Where capsparse's recipes depart from the official code through a field (docs/cap.md, differences 3 and 13):
# these values give the official behaviour back (``CAPConfig.recipe(name, official=True)``, ``prune --official``).
_ZERO_START_SCORES = dict(score_init_mode="constant", score_init=0.0)
OFFICIAL_CODE = {
    "glue-unstructured": dict(_ZERO_START_SCORES, representation="pooler"),
    "glue-structured": {},  # first-order: no movement scores; the pooler query is already the recipe's
    "squad-unstructured": dict(_ZERO_START_SCORES),  # the official SQuAD query is [CLS], as the recipe's
    "squad-structured": {},
}

# The TrainingArguments of the official scripts, for reference (docs/cap.md, Recipes).
RECIPE_TRAINING = {
    "glue-unstructured": dict(num_train_epochs=10, per_device_train_batch_size=32, learning_rate=3e-5,
                              warmup_steps=11000, weight_decay=0.0, max_grad_norm=1.0, seed=42),
    "glue-structured": dict(num_train_epochs=18, per_device_train_batch_size=16, learning_rate=2e-5,
                            weight_decay=0.01, max_grad_norm=1.0, seed=42),
    "squad-unstructured": dict(num_train_epochs=10, per_device_train_batch_size=16, learning_rate=3e-5,
                               warmup_steps=5400, weight_decay=0.0, max_grad_norm=1.0, seed=42),
    "squad-structured": dict(num_train_epochs=18, per_device_train_batch_size=16, learning_rate=3e-5,
                             weight_decay=0.01, max_grad_norm=1.0, seed=42),
}
