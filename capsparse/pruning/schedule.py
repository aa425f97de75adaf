"""The cubic pruning schedule of movement pruning, exactly as the official CAP / emmental scripts.

With ``w`` the schedule unit (the LR warm-up steps in the official scripts), ``i_w`` / ``f_w`` the
warm-up / cool-down multipliers and ``T`` the total number of optimizer steps, the scheduled value is::

    v_t = v_0                                                    for t <= i_w * w
    v_t = v_f                                                    for t >  T - f_w * w
    v_t = v_f + (v_0 - v_f) * (1 - (t - i_w w) / (T - (i_w + f_w) w)) ** 3   otherwise

and the soft-movement penalty ``lambda_t = lambda_final * v_t / v_f``. What ``v`` is belongs to the method
(:mod:`capsparse.pruning.method`): the *density* (kept fraction, ``1 -> 1 - sparsity``) for top-k methods, the
*sigmoid threshold* (``0 -> 0.1``) for soft movement. The official code calls both "threshold"; here the
``initial_threshold`` / ``final_threshold`` arguments of :func:`cubic_threshold` and
:meth:`CubicSchedule.resolve` are accepted under that name for compatibility.
"""
from __future__ import annotations

from typing import Optional, Tuple

SCHEDULE_UNITS = ("steps", "epochs", "fraction")


def cubic_value(step: int, total_steps: int, warmup_steps: float, initial_value: float, final_value: float,
                initial_warmup: float = 1.0, final_warmup: float = 1.0, final_lambda: float = 0.0
                ) -> Tuple[float, float]:
    """``(v_t, lambda_t)`` at optimizer step ``step`` (the official ``schedule_threshold``)."""
    if step <= initial_warmup * warmup_steps:
        value = initial_value
    elif step > total_steps - final_warmup * warmup_steps:
        value = final_value
    else:
        start = initial_warmup * warmup_steps
        span = total_steps - (initial_warmup + final_warmup) * warmup_steps
        coeff = 1.0 - (step - start) / span
        value = final_value + (initial_value - final_value) * coeff ** 3
    regu_lambda = final_lambda * value / final_value if final_value else 0.0
    return float(value), float(regu_lambda)


def cubic_threshold(step: int, total_steps: int, warmup_steps: float, initial_threshold: float,
                    final_threshold: float, initial_warmup: float = 1.0, final_warmup: float = 1.0,
                    final_lambda: float = 0.0) -> Tuple[float, float]:
    """:func:`cubic_value` under the official name and argument names."""
    return cubic_value(step, total_steps, warmup_steps, initial_threshold, final_threshold, initial_warmup,
                       final_warmup, final_lambda)


class CubicSchedule:
    """A resolved cubic schedule (everything in optimizer steps): ``schedule(step) -> (v_t, lambda_t)``.

    Use :meth:`resolve` to express the unit ``w`` in steps, epochs or as a fraction of training.
    """

    def __init__(self, total_steps: int, warmup_steps: float, initial_value: Optional[float] = None,
                 final_value: Optional[float] = None, initial_warmup: float = 2.0, final_warmup: float = 3.0,
                 final_lambda: float = 0.0, initial_threshold: Optional[float] = None,
                 final_threshold: Optional[float] = None):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.initial_value = _one_of(initial_value, initial_threshold, "initial_value", "initial_threshold")
        self.final_value = _one_of(final_value, final_threshold, "final_value", "final_threshold")
        self.initial_warmup = initial_warmup
        self.final_warmup = final_warmup
        self.final_lambda = final_lambda

    @classmethod
    def resolve(cls, total_steps: int, warmup: float, unit: str = "steps", steps_per_epoch: Optional[int] = None,
                **kwargs) -> "CubicSchedule":
        """``warmup`` in ``unit`` ("steps", "epochs" or "fraction" of ``total_steps``) -> steps."""
        if unit not in SCHEDULE_UNITS:
            raise ValueError(f"schedule unit: expected one of {SCHEDULE_UNITS}, got {unit!r}")
        if unit == "epochs":
            if not steps_per_epoch:
                raise ValueError("schedule unit 'epochs': expected steps_per_epoch > 0, got "
                                 f"{steps_per_epoch!r}")
            w = float(warmup) * steps_per_epoch
        elif unit == "fraction":
            w = float(warmup) * total_steps
        else:
            w = float(warmup)
        return cls(total_steps=int(total_steps), warmup_steps=w, **kwargs)

    def __call__(self, step: int) -> Tuple[float, float]:
        return cubic_value(step, self.total_steps, self.warmup_steps, self.initial_value, self.final_value,
                           self.initial_warmup, self.final_warmup, self.final_lambda)

    def __repr__(self) -> str:
        return f"CubicSchedule({', '.join(f'{k}={v!r}' for k, v in self.state_dict().items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CubicSchedule) and self.state_dict() == other.state_dict()

    @property
    def prune_start(self) -> float:
        return self.initial_warmup * self.warmup_steps

    @property
    def prune_end(self) -> float:
        return self.total_steps - self.final_warmup * self.warmup_steps

    def validate(self) -> None:
        """The pruning window must be non-empty, or the target is never reached (or reached at step 0)."""
        if self.prune_end <= self.prune_start:
            raise ValueError(
                f"sparsity schedule: the pruning window is empty (starts after step {self.prune_start:g}, ends at "
                f"step {self.prune_end:g} of {self.total_steps}); expected (initial_warmup + final_warmup) * w = "
                f"{(self.initial_warmup + self.final_warmup) * self.warmup_steps:g} < total steps. "
                f"Lower schedule_warmup or use schedule_unit='fraction'")

    def state_dict(self) -> dict:
        return dict(self.__dict__)


def _one_of(value, legacy, name: str, legacy_name: str) -> float:
    if value is not None and legacy is not None:
        raise ValueError(f"{name}: given both {name}={value!r} and its old name {legacy_name}={legacy!r}; "
                         f"expected one")
    if value is None and legacy is None:
        raise ValueError(f"{name}: expected a number, got none")
    return float(value if value is not None else legacy)
