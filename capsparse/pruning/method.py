"""One interface for every pruning method a training loop drives, each method owning its schedule.

A :class:`PruningMethod` is driven at four points of the loop (``global_step`` counts finished optimizer steps)::

    begin(total_steps, steps_per_epoch)   once, before training: resolve and check the schedule
    step_begin(global_step)               before the forwards of each optimizer step
    before_optimizer_step()               between backward and optimizer.step()
    step(global_step)                     after each optimizer step (and once at the start): the masks of the
                                          next forwards

and asked for :meth:`~PruningMethod.score_parameters` (their own optimizer group),
:meth:`~PruningMethod.regularization` with its weight :meth:`~PruningMethod.reg_lambda`,
:meth:`~PruningMethod.sparsity_report`, ``state_dict`` / ``load_state_dict`` (checkpoints) and
:meth:`~PruningMethod.finalize`.

- :class:`TopKPruning` (magnitude, movement, block movement): a :class:`~capsparse.pruning.pruners.Pruner`'s
  top-k at the cubic schedule's *density* (``1 -> 1 - target_sparsity``), updated after every optimizer step;
- :class:`SoftMovementPruning`: the cubic schedule's *sigmoid threshold* (``0 -> final_sigmoid_threshold``) and
  the L1 weight ``lambda_t``; its sparsity is set by the L1 weight, so the target is only approximate;
- :class:`StructuredPruning` (first-order, CAP-f): head / FFN-neuron masks pruned in ``steps`` equal stages, each
  a fresh linear LR warm-up / decay; the trainer supplies the importance loss and what happens around a stage.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..distributed import process_group
from ..sparsity import SparsityReport, sparsity_report
from .pruners import SCORE_ATTR, Pruner
from .schedule import CubicSchedule
from .structured import StructuredMasks, prune_count, select_units


class PruningMethod:
    """Base class: every hook is a no-op, nothing is learned or regularised."""

    name = "base"
    #: False when the reached sparsity is only approximately the target (soft movement: set by its L1 weight)
    exact_target = True
    #: True when the method prunes in stages of its own (first-order): the CAP banks' PrC / SnC snapshots are
    #: taken at the stages, not at the start and at epoch boundaries
    stagewise = False

    def __init__(self, model: nn.Module, target_sparsity: float):
        self.model = model
        self.target_sparsity = float(target_sparsity)

    # -- the loop ------------------------------------------------------------------------------------------
    def begin(self, total_steps: int, steps_per_epoch: int, num_train_epochs: Optional[float] = None) -> None:
        """Resolve the schedule for ``total_steps`` optimizer steps (``num_train_epochs``: as asked, if epochs
        define the length); raise when it cannot reach the target."""

    def step_begin(self, global_step: int) -> None:
        """Before the forwards of optimizer step ``global_step``."""

    def before_optimizer_step(self) -> None:
        """Between the backward and ``optimizer.step()``."""

    def step(self, global_step: int) -> None:
        """After an optimizer step (and once before the first): set the masks for the next forwards."""

    # -- what the objective and the optimizer need ----------------------------------------------------------
    def score_parameters(self) -> List[nn.Parameter]:
        return []

    def score_tensors(self) -> List[torch.Tensor]:
        """The tensors the last forward's score gradients reach (learned scores or saliency receptacles)."""
        return []

    def regularization(self) -> Optional[torch.Tensor]:
        return None

    def reg_lambda(self, global_step: int) -> float:
        """The weight of :meth:`regularization` at ``global_step``."""
        return 0.0

    def lr_factor(self, num_training_steps: int) -> Optional[Callable[[int], float]]:
        """A learning-rate multiplier per step when the method needs its own LR schedule, else ``None``."""
        return None

    # -- reporting, checkpoints, the end -------------------------------------------------------------------
    def sparsity_report(self) -> SparsityReport:
        return sparsity_report(self.model, ignore_params=(SCORE_ATTR,))

    def mask_turnover(self) -> Optional[float]:
        """Share of the kept units new since the last call (``None``: the method does not track it)."""
        return None

    def state_dict(self) -> dict:
        """The method's part of a checkpoint (``stage`` and ``pruner``, as the checkpoint files store them)."""
        return {"stage": 0, "pruner": None}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finalize(self) -> None:
        """Drop training-only hooks and parameters; the masks stay."""


class ScheduledPruning(PruningMethod):
    """A :class:`Pruner` whose masks follow a cubic schedule, updated once per optimizer step (after it); block
    movement's "fast" mode freezes the scores of pruned blocks across the step. What the scheduled value means is
    the subclass's."""

    def __init__(self, pruner: Pruner, target_sparsity: float, tolerance: float, warmup: float,
                 unit: str = "steps", initial_warmup: float = 2.0, final_warmup: float = 3.0):
        super().__init__(pruner.model, target_sparsity)
        self.pruner = pruner
        pruner.check_reachable(target_sparsity, tolerance)
        self._schedule_args = dict(warmup=warmup, unit=unit, initial_warmup=initial_warmup,
                                   final_warmup=final_warmup)
        self.schedule: Optional[CubicSchedule] = None

    def _schedule_values(self) -> dict:
        raise NotImplementedError

    def begin(self, total_steps, steps_per_epoch, num_train_epochs=None):
        a = self._schedule_args
        self.schedule = CubicSchedule.resolve(total_steps, a["warmup"], a["unit"], steps_per_epoch,
                                              initial_warmup=a["initial_warmup"], final_warmup=a["final_warmup"],
                                              **self._schedule_values())
        if self.target_sparsity > 0:
            self.schedule.validate()

    def before_optimizer_step(self):
        if getattr(self.pruner, "freezes_pruned", False):
            self.pruner.freeze_pruned()

    def step(self, global_step):
        if getattr(self.pruner, "freezes_pruned", False):
            self.pruner.restore_frozen()
        self.pruner.update(self.schedule(global_step)[0])

    def score_parameters(self):
        return self.pruner.score_parameters()

    def score_tensors(self):
        return self.pruner.score_tensors()

    def regularization(self):
        return self.pruner.regularization()

    def mask_turnover(self):
        return self.pruner.mask_turnover()

    def state_dict(self):
        return {"stage": 0, "pruner": self.pruner.state_dict()}

    def load_state_dict(self, state):
        if state.get("pruner") is not None:
            self.pruner.load_state_dict(state["pruner"])

    def finalize(self):
        self.pruner.remove()


class TopKPruning(ScheduledPruning):
    """Magnitude, movement, block movement: the top-k of the pruner's scores at the scheduled *density* (the kept
    fraction, ``1 -> 1 - target_sparsity``)."""

    name = "top-k"

    def _schedule_values(self):
        return dict(initial_value=1.0, final_value=1.0 - self.target_sparsity)

    def density(self, global_step: int) -> float:
        return self.schedule(global_step)[0]


class SoftMovementPruning(ScheduledPruning):
    """Soft movement: the cubic schedule of the *sigmoid threshold* (``0 -> final_sigmoid_threshold``) and of the
    L1 weight (``lambda_t = lambda_final * tau_t / tau_f``); the L1 penalty sets the sparsity it reaches."""

    name = "soft-movement"
    exact_target = False

    def __init__(self, pruner: Pruner, target_sparsity: float, tolerance: float, warmup: float,
                 final_sigmoid_threshold: float, lambda_final: float, **kwargs):
        super().__init__(pruner, target_sparsity, tolerance, warmup, **kwargs)
        self.final_sigmoid_threshold = float(final_sigmoid_threshold)
        self.lambda_final = float(lambda_final)

    def _schedule_values(self):
        return dict(initial_value=0.0, final_value=self.final_sigmoid_threshold, final_lambda=self.lambda_final)

    def sigmoid_threshold(self, global_step: int) -> float:
        return self.schedule(global_step)[0]

    def reg_lambda(self, global_step):
        return 0.0 if self.schedule is None else self.schedule(global_step)[1]


class StructuredPruning(PruningMethod):
    """First-order structured pruning (CAP-f): the total optimizer steps are split into ``steps`` equal stages; at
    the start of stage ``s`` the importance of every head / FFN neuron is accumulated and the least important are
    masked until ``target_sparsity * (s + 1) / steps`` of them are gone (one head per layer protected).

    Args:
        importance_inputs: ``stage -> (loss_fn(batch) -> loss, batches)`` for the importance pass.
        before_masks, after_masks: ``stage -> None``, called just before / after the new masks are applied (CAP
            encodes the student for its banks before; a fresh optimizer state after).
    """

    name = "first-order"
    stagewise = True

    def __init__(self, model: nn.Module, target_sparsity: float, steps: int, heads_protected: int = 1,
                 warmup_ratio: float = 0.1, epochs_per_step: Optional[float] = None,
                 importance_inputs: Optional[Callable[[int], Tuple[Callable, Iterable]]] = None,
                 before_masks: Optional[Callable[[int], None]] = None,
                 after_masks: Optional[Callable[[int], None]] = None):
        super().__init__(model, target_sparsity)
        self.masks = StructuredMasks(model)
        self.steps = int(steps)
        self.heads_protected = int(heads_protected)
        self.warmup_ratio = float(warmup_ratio)
        self.epochs_per_step = epochs_per_step
        self.importance_inputs = importance_inputs
        self.before_masks = before_masks or (lambda stage: None)
        self.after_masks = after_masks or (lambda stage: None)
        self.stage = 0
        self.stage_len: Optional[int] = None

    def begin(self, total_steps, steps_per_epoch, num_train_epochs=None):
        self.stage_len = total_steps // self.steps
        if self.stage_len < 1:
            raise ValueError(f"structured_steps: {self.steps} pruning steps need at least as many optimizer steps, "
                             f"got {total_steps}")
        if num_train_epochs is not None and self.epochs_per_step is not None:
            expected = self.steps * self.epochs_per_step
            if abs(float(num_train_epochs) - expected) > 1e-6:
                warnings.warn(f"first-order: num_train_epochs={num_train_epochs} but structured_steps * "
                              f"epochs_per_step = {expected:g}; the {total_steps} steps are split evenly into "
                              f"{self.steps} pruning steps", stacklevel=3)

    def fraction(self, stage: int) -> float:
        """The cumulative pruned fraction of heads and of neurons after ``stage``."""
        return round(self.target_sparsity * (stage + 1) / self.steps, 10)

    def step_begin(self, global_step):
        if self.stage >= self.steps:
            return
        if global_step >= self.stage * self.stage_len:
            self.prune_stage(self.stage)
            self.stage += 1

    def prune_stage(self, stage: int) -> None:
        """Importance -> new masks -> ``before_masks`` -> apply -> ``after_masks``."""
        if self.importance_inputs is None:
            raise ValueError("importance_inputs: expected a callable giving the importance loss and batches, got None")
        masks, fraction = self.masks, self.fraction(stage)
        loss_fn, batches = self.importance_inputs(stage)
        was = self.model.training
        self.model.eval()
        imp_h, imp_n = masks.accumulate_importance(loss_fn, batches)
        self.model.train(was)
        dist = process_group(multi=True)
        if dist is not None:
            dist.all_reduce(imp_h)
            dist.all_reduce(imp_n)
        heads, neurons = masks.head_masks() > 0, masks.neuron_masks() > 0
        new_h = select_units(imp_h, heads, prune_count(heads.numel(), fraction), self.heads_protected)
        new_n = select_units(imp_n, neurons, prune_count(neurons.numel(), fraction), 0)
        self.before_masks(stage)
        masks.set_masks(new_h.float(), new_n.float())
        self.after_masks(stage)

    def lr_factor(self, num_training_steps):
        n, ratio = self.steps, self.warmup_ratio
        stage_len = max(1, num_training_steps // n)

        def factor(step):  # a fresh linear warm-up / decay per pruning step (official: new scheduler)
            stage = min(step // stage_len, n - 1)
            pos = step - stage * stage_len
            length = stage_len if stage < n - 1 else max(1, num_training_steps - stage * stage_len)
            warm = int(ratio * length)
            if pos < warm:
                return pos / max(1, warm)
            return max(0.0, (length - pos) / max(1, length - warm))
        return factor

    def state_dict(self):
        return {"stage": self.stage, "pruner": None}

    def load_state_dict(self, state):
        self.stage = int(state["stage"])
