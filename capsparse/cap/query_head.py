"""CAPConfig.query_head: a trainable linear map between the student's representation and the contrastive loss.

The official CAP contrasts the student's sentence vector itself against the banks' vectors (the pre-trained,
snapshot and fine-tuned models'), so every contrastive gradient lands on the vector the classifier also reads.
With ``query_head="linear"`` the query is ``A q + c`` first (``A`` starts at the identity, ``c`` at zero: the first
step is the official one), as contrastive representation distillation (CRD, Tian et al. 2020) embeds the student
before contrasting it with a teacher: the student need only carry the banks' information up to a linear map,
not in their exact coordinates. Only the query side is mapped (the banks hold fixed vectors from other models),
and the batch's own queries, which are keys too, are the mapped ones (detached). The head is training-only: it
lives beside the model, in the optimizer (weight lr, no weight decay) and in ``cap_state.pt``, never in an export.
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import process_group

#: CAPConfig.query_head values
QUERY_HEADS = ("none", "linear")


class LinearQueryHead(nn.Linear):
    """``q -> A q + c`` over the hidden size, starting at the identity."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, hidden_size)
        with torch.no_grad():
            self.weight.copy_(torch.eye(hidden_size))
            self.bias.zero_()

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return super().forward(query.to(self.weight.dtype))


def build_query_head(kind: str, hidden_size: int):
    """The head that ``CAPConfig.query_head`` (validated there) names, or ``None`` for ``"none"``."""
    return LinearQueryHead(hidden_size) if kind == "linear" else None


def average_head_grads(head: nn.Module) -> None:
    """Under torchrun, average the head's gradients over processes (it is outside the DDP-wrapped model)."""
    dist = process_group(multi=True)
    if dist is None:
        return
    for p in head.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())
