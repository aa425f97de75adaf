"""The cubic sparsity schedule of movement pruning, exactly as the official CAP / emmental scripts.

With ``w`` the schedule unit (the LR warm-up steps in the official scripts), ``i_w`` / ``f_w`` the
warm-up / cool-down multipliers and ``T`` the total number of optimizer steps::

    tau_t = tau_0                                                    for t <= i_w * w
    tau_t = tau_f                                                    for t >  T - f_w * w
    tau_t = tau_f + (tau_0 - tau_f) * (1 - (t - i_w w) / (T - (i_w + f_w) w)) ** 3   otherwise

and the soft-movement penalty ``lambda_t = lambda_final * tau_t / tau_f``. For top-k methods ``tau``
is the fraction kept (``tau_0 = 1``); for soft movement it is the sigmoid threshold (``0 -> 0.1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

SCHEDULE_UNITS = ("steps", "epochs", "fraction")


def cubic_threshold(step: int, total_steps: int, warmup_steps: float, initial_threshold: float,
                    final_threshold: float, initial_warmup: float = 1.0, final_warmup: float = 1.0,
                    final_lambda: float = 0.0) -> Tuple[float, float]:
    """``(tau_t, lambda_t)`` at optimizer step ``step`` (the official ``schedule_threshold``)."""
    if step <= initial_warmup * warmup_steps:
        threshold = initial_threshold
    elif step > total_steps - final_warmup * warmup_steps:
        threshold = final_threshold
    else:
        start = initial_warmup * warmup_steps
        span = total_steps - (initial_warmup + final_warmup) * warmup_steps
        coeff = 1.0 - (step - start) / span
        threshold = final_threshold + (initial_threshold - final_threshold) * coeff ** 3
    regu_lambda = final_lambda * threshold / final_threshold if final_threshold else 0.0
    return float(threshold), float(regu_lambda)


@dataclass
class CubicSchedule:
    """A resolved cubic schedule (everything in optimizer steps).

    Use :meth:`resolve` to express the unit ``w`` in steps, epochs or as a fraction of training.
    """

    total_steps: int
    warmup_steps: float
    initial_threshold: float
    final_threshold: float
    initial_warmup: float = 2.0
    final_warmup: float = 3.0
    final_lambda: float = 0.0

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
        return cubic_threshold(step, self.total_steps, self.warmup_steps, self.initial_threshold,
                               self.final_threshold, self.initial_warmup, self.final_warmup, self.final_lambda)

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
