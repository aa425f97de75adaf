"""NaN/inf guards for losses, gradients, scores and parameters.

Two policies:

* ``"skip"``: the optimizer step is skipped (every gradient is set to ``None``, so ``torch.optim`` optimizers
  leave the parameters *and* their moments untouched) and a warning names the first bad tensor and the step.
  After ``max_consecutive_skips`` skips in a row the guard raises anyway: a run that never steps is broken.
* ``"stop"``: :class:`NonFiniteError` is raised, naming the tensor (parameter name) and the step.

Non-finite *parameters* (weights or scores after an update) cannot be skipped: they always raise.

Mixed precision: with fp16 autocast and a ``GradScaler`` (Trainer ``fp16=True`` on a GPU), inf/NaN gradients are
the scaler's normal overflow signal: the scaler skips ``optimizer.step`` and halves the scale. Pass
``amp_scaler=True``: a non-finite gradient is then only counted (``overflow_steps``) and left to the scaler, unless
the scale has fallen below ``min_scale`` (persistent overflow: a real divergence), where the policy applies. The
callback does this only when the optimizer really holds an enabled scaler (never because ``args.fp16`` says so).
bf16 and fp32 have no scaler: non-finite values are real and the policy applies. Non-finite losses are always
real (the scaler never produces them).

Checks cost one host sync per call (all tensors reduced to one flag); names are looked up only on failure.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from ._lazy import lazy_callbacks

logger = logging.getLogger(__name__)

POLICIES = ("skip", "stop")
NamedTensors = Union[torch.nn.Module, Dict[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]


class NonFiniteError(FloatingPointError):
    """A loss, gradient, score or parameter is NaN or inf; the message names it and the step."""


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    return policy


def _named(tensors: NamedTensors) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(tensors, torch.nn.Module):
        return list(tensors.named_parameters())
    if isinstance(tensors, dict):
        return list(tensors.items())
    return list(tensors)


def _describe(t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} inf of {t.numel()} values"


def find_nonfinite(tensors: NamedTensors, grads: bool = False) -> List[Tuple[str, str]]:
    """``[(name, description)]`` of the tensors (or their ``.grad`` with ``grads=True``) holding NaN/inf.

    One host sync when everything is finite."""
    pairs = []
    for name, t in _named(tensors):
        t = t.grad if grads else t
        if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        pairs.append((name, t.detach()))
    if not pairs:
        return []
    flags = torch.stack([torch.isfinite(t).all().to(pairs[0][1].device) for _, t in pairs])
    if bool(flags.all()):
        return []
    return [(name, _describe(t)) for (name, t), ok in zip(pairs, flags.tolist()) if not ok]


def _message(what: str, bad: List[Tuple[str, str]], step) -> str:
    first = "; ".join(f"{n} ({d})" for n, d in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    where = f" at step {step}" if step is not None else ""
    return f"non-finite {what}{where}: {first}{more}"


def is_finite_loss(loss) -> bool:
    if isinstance(loss, torch.Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    return math.isfinite(float(loss))


def check_loss(loss, step=None, policy: str = "stop", name: str = "loss") -> bool:
    """``True`` if ``loss`` is finite; else raise (``"stop"``) or warn and return ``False`` (``"skip"``: the
    caller skips backward and the optimizer step)."""
    _check_policy(policy)
    if is_finite_loss(loss):
        return True
    value = float(loss.detach().float().reshape(-1)[0]) if isinstance(loss, torch.Tensor) else float(loss)
    msg = _message("loss", [(name, f"value {value}")], step)
    if policy == "stop":
        raise NonFiniteError(msg)
    logger.warning("capsparse: %s; skipping this step", msg)
    return False


def zero_grads(params: NamedTensors, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Drop all gradients (``None``), so that ``optimizer.step()`` leaves parameters and moments unchanged."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for _, p in _named(params):
        p.grad = None


def check_gradients(params: NamedTensors, step=None, policy: str = "stop",
                    optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
    """``True`` if every gradient is finite. Else ``"stop"`` raises naming the parameter(s) and the step;
    ``"skip"`` drops all gradients (the next ``optimizer.step()`` changes nothing) and returns ``False``."""
    _check_policy(policy)
    bad = find_nonfinite(params, grads=True)
    if not bad:
        return True
    msg = _message("gradient", bad, step)
    if policy == "stop":
        raise NonFiniteError(msg)
    logger.warning("capsparse: %s; skipping the optimizer step", msg)
    zero_grads(params, optimizer)
    return False


def check_values(tensors: NamedTensors, step=None, what: str = "parameter") -> None:
    """Raise :class:`NonFiniteError` if any tensor (weights, movement scores, bank entries) holds NaN/inf."""
    bad = find_nonfinite(tensors)
    if bad:
        raise NonFiniteError(_message(what, bad, step))


class NanGuard:
    """Stateful guard for a training loop (plain or inside a Trainer).

    Args:
        policy: ``"skip"`` or ``"stop"``.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never).
        amp_scaler: ``True`` when a ``GradScaler`` is active (fp16): non-finite gradients are left to the scaler
            (counted in ``overflow_steps``) unless ``scaler_scale() < min_scale``.
        score_pattern: regular expression selecting the parameters checked by :meth:`check_scores` (CAP
            movement scores are named ``...movement_scores...``).

    Plain loop::

        guard = NanGuard("skip")
        loss = compute_loss(batch)
        if guard.check_loss(loss, step):
            loss.backward()
            if guard.check_gradients(model, step, optimizer):
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    """

    def __init__(self, policy: str = "skip", max_consecutive_skips: Optional[int] = 20, amp_scaler: bool = False,
                 min_scale: float = 2.0 ** -14, score_pattern: str = r"score"):
        self.policy = _check_policy(policy)
        if max_consecutive_skips is not None and (not isinstance(max_consecutive_skips, int)
                                                  or max_consecutive_skips < 1):
            raise ValueError(f"max_consecutive_skips: expected an int >= 1 or None, got {max_consecutive_skips!r}")
        self.max_consecutive_skips = max_consecutive_skips
        self.amp_scaler = bool(amp_scaler)
        self.min_scale = float(min_scale)
        self.score_re = re.compile(score_pattern)
        self.skipped_steps: List = []
        self.overflow_steps: List = []
        self._consecutive = 0

    def _skipped(self, step) -> None:
        self.skipped_steps.append(step)
        self._consecutive += 1
        if self.max_consecutive_skips is not None and self._consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(f"non-finite values in {self._consecutive} consecutive steps (last: step {step}); "
                                 f"skipped steps so far: {self.skipped_steps[-10:]}; the run is diverging: lower "
                                 f"the learning rate, check the data, or use fp32/bf16")

    def ok(self) -> None:
        self._consecutive = 0

    def check_loss(self, loss, step=None) -> bool:
        if check_loss(loss, step, self.policy):
            return True
        self._skipped(step)
        return False

    def check_gradients(self, params: NamedTensors, step=None, optimizer=None, scaler_scale=None) -> bool:
        if self.amp_scaler:
            bad = find_nonfinite(params, grads=True)
            if not bad:
                self.ok()
                return True
            scale = scaler_scale() if callable(scaler_scale) else scaler_scale
            if scale is None or float(scale) >= self.min_scale:
                self.overflow_steps.append(step)
                logger.debug("capsparse: fp16 overflow at step %s (%s); left to the GradScaler", step, bad[0][0])
                return False
            logger.warning("capsparse: GradScaler scale %.3g < min_scale %.3g: persistent overflow", scale,
                           self.min_scale)
        if check_gradients(params, step, self.policy, optimizer):
            self.ok()
            return True
        self._skipped(step)
        return False

    def check_scores(self, model: torch.nn.Module, step=None) -> None:
        """Movement scores (parameters matching ``score_pattern``) must stay finite: raise otherwise."""
        check_values([(n, p) for n, p in model.named_parameters() if self.score_re.search(n)], step, what="score")

    def check_parameters(self, model: torch.nn.Module, step=None) -> None:
        check_values(model, step, what="parameter")


def active_scaler(optimizer):
    """The enabled ``GradScaler`` an (accelerate-wrapped) optimizer steps through, else ``None``."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _make_callback_class():
    from transformers import TrainerCallback

    class NanGuardCallback(TrainerCallback):
        """Trainer callback: gradients are checked in ``on_pre_optimizer_step`` (after clipping, before
        ``optimizer.step()``); ``"skip"`` drops them so the step changes nothing. Scores (and with
        ``check_parameters`` every parameter) are checked in ``on_step_end``, and always raise.

        The guard runs in GradScaler mode (see the module docstring) only while the optimizer holds an enabled
        ``GradScaler`` (accelerate's optimizer wrapper carries it as ``.scaler``). Steps are reported as
        ``state.global_step + 1`` (the step being taken), the Trainer's numbering.
        """

        def __init__(self, policy: str = "skip", max_consecutive_skips: Optional[int] = 20,
                     check_parameters: bool = False, score_pattern: str = r"score", min_scale: float = 2.0 ** -14):
            self.guard = NanGuard(policy, max_consecutive_skips, score_pattern=score_pattern, min_scale=min_scale)
            self.check_params = check_parameters

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is None:
                return
            scaler = active_scaler(optimizer)
            self.guard.amp_scaler = scaler is not None
            self.guard.check_gradients(model, state.global_step + 1, optimizer,
                                       scaler_scale=None if scaler is None else scaler.get_scale)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            if self.check_params:
                self.guard.check_parameters(model, state.global_step)
            else:
                self.guard.check_scores(model, state.global_step)

    return NanGuardCallback


__getattr__ = lazy_callbacks(__name__, NanGuardCallback=_make_callback_class)

__all__ = ["NonFiniteError", "POLICIES", "find_nonfinite", "is_finite_loss", "check_loss", "check_gradients",
           "check_values", "zero_grads", "NanGuard", "NanGuardCallback"]
