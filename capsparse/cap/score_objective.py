"""What movement scores learn from: the whole CAP objective (official) or its task terms only.

With ``score_objective="task"`` the contrastive terms still train the weights, but the scores' gradient is
that of CE + KD (+ L1) alone. The Trainer runs one backward of the whole loss, scaled by whatever it applies
(gradient accumulation, an AMP gradient scaler); :class:`TaskScoreGradients` takes the task terms' score
gradient beforehand (one extra backward through the graph) and, in that backward, replaces each score's
incoming gradient by it, times the scale read off the loss's own gradient. So it holds for any scaling the
Trainer does.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

#: CAPConfig.score_objective values
SCORE_OBJECTIVES = ("full", "task")


class TaskScoreGradients:
    """One-shot gradient hooks: after :meth:`arm`, the next backward of ``total`` gives ``scores`` the
    gradient of ``task`` (with the same scale) instead of that of ``total``."""

    def __init__(self):
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def arm(self, total: torch.Tensor, task: torch.Tensor, scores: Sequence[torch.Tensor]) -> None:
        self.disarm()  # hooks a backward never reached (e.g. a skipped step) must not leak into the next one
        scores = [s for s in scores if s.requires_grad]
        if not scores or not total.requires_grad:
            return
        task_grads = torch.autograd.grad(task, scores, retain_graph=True, allow_unused=True)
        scale = []  # d(what the Trainer backpropagates) / d(total): 1 / accumulation steps, times an AMP scale

        def on_total(grad):
            scale.append(grad)

        def replace(task_grad, own):
            def hook(grad):
                own[0].remove()  # one backward only
                if not scale:
                    raise RuntimeError("score_objective='task': a score's gradient arrived before the loss's")
                return torch.zeros_like(grad) if task_grad is None else (scale[-1] * task_grad).to(grad.dtype)
            return hook

        self._handles.append(total.register_hook(on_total))
        for s, g in zip(scores, task_grads):
            own = []
            own.append(s.register_hook(replace(g, own)))
            self._handles.append(own[0])
