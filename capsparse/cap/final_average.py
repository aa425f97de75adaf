"""``final_average="ema"``: an exponential moving average of the trained weights over the final-mask steps.

Once the cubic schedule has reached its final mask, each optimizer step folds the model's trainable weights
into ``avg <- decay * avg + (1 - decay) * w`` (the first final-mask step starts ``avg`` at its weights, so no
bias correction is needed); when training ends the model takes the averaged weights. The masks are not
averaged: the end keeps the scores' own final masks, so the sparsity is exactly the schedule's. Scores and
frozen parameters are left out (they are not what the model computes with once the masks are final).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

#: CAPConfig.final_average values
FINAL_AVERAGES = ("none", "ema")


class FinalMaskAverage:
    """EMA of ``model``'s trainable parameters other than ``skip``-suffixed ones (the movement scores)."""

    def __init__(self, model: nn.Module, decay: float, skip: tuple = ()):
        self.decay = float(decay)
        self.params: Dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(tuple(skip))}
        self.avg: Optional[Dict[str, torch.Tensor]] = None
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        if self.avg is None:
            self.avg = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            for n, p in self.params.items():
                self.avg[n].lerp_(p.detach(), 1.0 - self.decay)
        self.steps += 1

    @torch.no_grad()
    def apply(self) -> bool:
        """Copy the average into the model; False when no final-mask step was averaged."""
        if self.avg is None:
            return False
        for n, p in self.params.items():
            p.copy_(self.avg[n])
        return True

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "avg": self.avg}

    def load_state_dict(self, state: dict) -> None:
        avg = state.get("avg")
        if avg is not None and set(avg) != set(self.params):
            missing, extra = sorted(set(self.params) - set(avg)), sorted(set(avg) - set(self.params))
            raise ValueError(f"final_average: the checkpoint's average does not match the model's trainable "
                             f"parameters (missing {missing[:3]}, unexpected {extra[:3]})")
        self.steps = int(state.get("steps", 0))
        self.avg = None if avg is None else {n: t.to(self.params[n].device, self.params[n].dtype).clone()
                                             for n, t in avg.items()}
