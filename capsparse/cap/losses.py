"""The CAP objective and the sentence representations it contrasts.

    L = w_ce * CE + sum_b (w_u * L_u^b + w_s * L_s^b) + w_kd * T^2 * KL(p_T || p_S) (batchmean) + lambda_t * L1
        [+ w_hidden * mean_l MSE(h_S^l, h_T^l): layer-wise distillation, off by default]
        [+ w_attention * mean_l KL(A_T^l || A_S^l): attention-distribution distillation, off by default]

The contrastive terms use :func:`capsparse.ops.cap_contrastive_loss` per bank, with the keys of
:meth:`capsparse.cap.banks.BankSet.keys_for`. Teacher logits come from the per-example cache filled
during the FiC encoding pass. Which task and KD losses apply is the task head's
(:mod:`capsparse.cap.heads`).

Question answering (SQuAD, official ``masked_run_squad.py``): the logits are ``[B, L, 2]`` (start, end),
the labels ``[B, 2]`` (start, end token positions). CE is the mean of the start and end cross-entropies
(the ``...ForQuestionAnswering`` models' own loss); KD is the mean of the start and end
``T^2 * KL`` (each ``batchmean``, softmax over the sequence). The KD softmax runs over the real tokens
only (``attention_mask``): batches are padded dynamically, so padding positions would otherwise change
with the batch (the official code pads every feature to 384 and includes the padding).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.contrastive import cap_contrastive_loss


class RepresentationTap:
    """Forward hooks that record what the representations need, without patching classes:

    - the input of ``model.classifier`` (pooler output after the classifier dropout: the official query);
    - the output of ``model.base_model`` (last hidden state, pooler output).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = getattr(model, "base_model", None)
        if self.base is None:
            raise ValueError(f"model: expected a transformers model with base_model, got {type(model).__name__}")
        self.classifier_input = None
        self.base_output = None
        self._handles = [self.base.register_forward_hook(self._on_base)]
        head = getattr(model, "classifier", None)
        if head is not None:
            self._handles.append(head.register_forward_pre_hook(self._on_head))

    def _on_base(self, module, args, output):
        self.base_output = output

    def _on_head(self, module, args):
        self.classifier_input = args[0]

    def clear(self) -> None:
        self.classifier_input = self.base_output = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def representation(self, kind: str, attention_mask: Optional[torch.Tensor], query: bool) -> torch.Tensor:
        """``kind`` in pooler / cls / mean; ``query=True`` takes the post-dropout pooler (official query)."""
        out = self.base_output
        if kind == "pooler":
            if query and self.classifier_input is not None:
                return self.classifier_input
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ValueError("representation='pooler': the model has no pooler output; use 'cls' or 'mean'")
            return pooled
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if kind == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# logit value for padding positions in the QA KD softmax: exp underflows to exactly 0 in fp32
QA_PAD_LOGIT = -1e4


class QueryKeyTap:
    """Forward hooks on the query and key projections of every encoder self-attention (modules with ``query``,
    ``key`` and ``attention_head_size``, as BERT's): while :attr:`on`, the last forward's ``(q, k)`` per layer,
    for the attention-distribution term."""

    def __init__(self, model: nn.Module):
        attentions = [m for m in model.modules()
                      if all(hasattr(m, a) for a in ("query", "key", "attention_head_size"))]
        if not attentions:
            raise ValueError(f"model: w_attention needs self-attention modules with query / key projections, "
                             f"{type(model).__name__} has none")
        self.head_dim = int(attentions[0].attention_head_size)
        self.on = False
        self._out: Dict[tuple, torch.Tensor] = {}
        self._handles = []
        for i, m in enumerate(attentions):
            for role in ("q", "k"):
                module = m.query if role == "q" else m.key
                self._handles.append(module.register_forward_hook(self._recorder((i, role))))
        self.layers = len(attentions)

    def _recorder(self, key):
        def hook(module, args, output):
            if self.on:
                self._out[key] = output
        return hook

    def pairs(self):
        """``[(q, k)]`` per layer from the last forward while on."""
        missing = [i for i in range(self.layers) if (i, "q") not in self._out or (i, "k") not in self._out]
        if missing:
            raise RuntimeError(f"QueryKeyTap: no query / key output recorded for layers {missing}")
        return [(self._out[(i, "q")], self._out[(i, "k")]) for i in range(self.layers)]

    @contextlib.contextmanager
    def recording(self):
        """Record the forwards run inside the block (earlier records are dropped first)."""
        self._out = {}
        self.on = True
        try:
            yield self
        finally:
            self.on = False

    def clear(self) -> None:
        self._out = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def qa_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SQuAD KD: ``(KD(start) + KD(end)) / 2`` with ``KD = T^2 * KL(softmax(z_T/T) || softmax(z_S/T))``, ``batchmean``.

    Args:
        student_logits: ``[B, L, 2]`` (start, end).
        teacher_logits: ``[B, L_t, 2]``; sliced or padded to ``L`` (positions beyond a feature's length are
            padding, masked below).
        attention_mask: ``[B, L]``; padding positions are left out of both softmaxes. ``None``: all positions.
    """
    b, length = student_logits.shape[:2]
    t = float(temperature)
    teacher = teacher_logits.to(device=student_logits.device, dtype=torch.float32)
    if teacher.shape[1] < length:
        teacher = F.pad(teacher, (0, 0, 0, length - teacher.shape[1]), value=QA_PAD_LOGIT)
    teacher = teacher[:, :length]
    s, z = student_logits.float() / t, teacher / t
    if attention_mask is not None:
        pad = ~attention_mask.to(device=s.device).bool().unsqueeze(-1)
        s, z = s.masked_fill(pad, QA_PAD_LOGIT), z.masked_fill(pad, QA_PAD_LOGIT)
    kl = F.kl_div(F.log_softmax(s, dim=1), F.softmax(z, dim=1), reduction="sum") / b  # start + end, batchmean
    return kl / 2 * t * t


def qa_task_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(CE(start) + CE(end)) / 2``, as ``BertForQuestionAnswering``: positions outside ``[0, L)`` are ignored.

    ``logits`` ``[B, L, 2]``, ``positions`` ``[B, 2]`` (start, end token indices)."""
    length = logits.shape[1]
    pos = positions.to(logits.device).long().clamp(0, length)
    start = F.cross_entropy(logits[..., 0].float(), pos[:, 0], ignore_index=length)
    end = F.cross_entropy(logits[..., 1].float(), pos[:, 1], ignore_index=length)
    return (start + end) / 2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            regression: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax(z_T / T) || softmax(z_S / T))`` with ``batchmean`` (MSE for regression)."""
    if regression:
        return F.mse_loss(student_logits.float().reshape(-1), teacher_logits.float().reshape(-1))
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean") * t * t


def hidden_distillation_loss(student_hidden, teacher_hidden, attention_mask: Optional[torch.Tensor] = None
                             ) -> torch.Tensor:
    """Layer-wise distillation: the mean over layers of the per-element MSE between student and teacher hidden
    states ``[B, L, D]``, over the real tokens (``attention_mask`` ``[B, L]``; ``None``: all of them).

    ``student_hidden`` / ``teacher_hidden``: sequences of equal length (one tensor per layer)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden states: expected the same number of layers from student and teacher, got "
                         f"{len(student_hidden)} and {len(teacher_hidden)}")
    weight = None
    if attention_mask is not None:
        weight = attention_mask.to(device=student_hidden[0].device, dtype=torch.float32).unsqueeze(-1)
        denom = weight.sum().clamp_min(1.0) * student_hidden[0].shape[-1]
    total = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden):
        sq = (hs.float() - ht.detach().float().to(hs.device)) ** 2
        total = total + (sq.mean() if weight is None else (sq * weight).sum() / denom)
    return total / len(student_hidden)


def attention_distillation_loss(student_qk, teacher_qk, head_dim: int,
                                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention-distribution distillation: the mean over layers of ``KL(A_T || A_S)`` per query row, averaged
    over heads and real query tokens, with ``A = softmax(q k^T / sqrt(d_head))`` over the real keys.

    ``student_qk`` / ``teacher_qk``: sequences (one per layer) of ``(q, k)`` projections ``[B, L, D]``, ``D`` a
    multiple of ``head_dim`` and the same in student and teacher; ``attention_mask`` ``[B, L]`` (1 = real token;
    ``None``: all of them)."""
    if len(student_qk) != len(teacher_qk) or not student_qk:
        raise ValueError(f"attention projections: expected the same number of layers from student and teacher, "
                         f"got {len(student_qk)} and {len(teacher_qk)}")
    q0 = student_qk[0][0]
    keep = None if attention_mask is None else attention_mask.to(device=q0.device, dtype=torch.bool)
    total = 0.0
    for layer, ((qs, ks), (qt, kt)) in enumerate(zip(student_qk, teacher_qk)):
        if qs.shape != qt.shape or qs.shape[-1] % head_dim:
            raise ValueError(f"attention projections of layer {layer}: expected student and teacher of one shape, a "
                             f"multiple of head_dim={head_dim} wide, got {tuple(qs.shape)} and {tuple(qt.shape)}")
        log_s = _attention_log_probs(qs.float(), ks.float(), head_dim, keep)
        with torch.no_grad():
            log_t = _attention_log_probs(qt.detach().float().to(qs.device), kt.detach().float().to(qs.device),
                                         head_dim, keep)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, H, L]: padded keys have t = 0 and add nothing
        if keep is None:
            total = total + kl.mean()
        else:
            rows = keep[:, None, :].to(kl.dtype)
            total = total + (kl * rows).sum() / (rows.sum() * kl.shape[1]).clamp_min(1.0)
    return total / len(student_qk)


def _attention_log_probs(q, k, d: int, keep: Optional[torch.Tensor]) -> torch.Tensor:
    b, length, width = q.shape
    q = q.view(b, length, width // d, d).transpose(1, 2)
    k = k.view(b, -1, width // d, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) * d ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over ``[B, C]`` logits."""
    return F.cross_entropy(logits.float(), labels.long())


def regression_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE of the ``[B, 1]`` predictions."""
    return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1))


def cap_objective(config, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                  query: Optional[torch.Tensor], banks=None, teacher_logits: Optional[torch.Tensor] = None,
                  contrastive_labels: Optional[torch.Tensor] = None, regularization: Optional[torch.Tensor] = None,
                  reg_lambda: float = 0.0, use_contrastive: bool = True, attention_mask: Optional[torch.Tensor] = None,
                  head=None, split: bool = False, hidden=None, attention=None):
    """``(total, components)``; components are detached scalars (ce, kd, <bank>_u, <bank>_s, l1).
    ``split=True``: ``(total, components, task, contrastive)``, ``total`` split into its task terms (CE, KD, L1)
    and its contrastive terms (``None`` when there are none), both in the graph, for routing their gradients.

    ``head``: the task head (:mod:`capsparse.cap.heads`) whose ``task_loss`` and ``kd_loss`` (given
    ``attention_mask``) apply; ``None``: classification (CE, ``T^2 * KL``). ``contrastive_labels=None``:
    unsupervised positives only (question answering has no labels to compare). ``hidden``: ``(student layers,
    teacher layers)`` for the layer-wise distillation term (``config.w_hidden``), or ``None``. ``attention``:
    ``(student (q, k) per layer, teacher (q, k) per layer, head_dim)`` for the attention-distribution term
    (``config.w_attention``), or ``None``."""
    parts: Dict[str, torch.Tensor] = {}
    ce = head.task_loss(logits, labels) if head is not None else classification_loss(logits, labels)
    total = config.w_ce * ce
    parts["ce"] = ce.detach()
    contrastive = None
    if teacher_logits is not None and config.w_kd > 0:
        if head is not None:
            kd = head.kd_loss(logits, teacher_logits, config.kd_temperature, attention_mask)
        else:
            kd = kd_loss(logits, teacher_logits.to(logits.device), config.kd_temperature)
        total = total + config.w_kd * kd
        parts["kd"] = kd.detach()
    if hidden is not None and config.w_hidden > 0:
        hd = hidden_distillation_loss(hidden[0], hidden[1], attention_mask)
        total = total + config.w_hidden * hd
        parts["hidden"] = hd.detach()
    if attention is not None and config.w_attention > 0:
        ad = attention_distillation_loss(attention[0], attention[1], attention[2], attention_mask)
        total = total + config.w_attention * ad
        parts["attention"] = ad.detach()
    if use_contrastive and banks is not None and query is not None:
        supervised = config.w_s > 0 and contrastive_labels is not None
        for name, bank in banks.ready().items():
            keys, key_ids, key_labels, exclude = banks.keys_for(
                name, query, ids, contrastive_labels if supervised else None, config.n_extra_keys)
            loss_u, loss_s = cap_contrastive_loss(
                query, keys, ids.to(query.device), key_ids,
                contrastive_labels.to(query.device) if supervised else None,
                key_labels if supervised else None,
                temperature=config.temperature, normalization=config.normalization, exclude_index=exclude)
            term = config.w_u * loss_u
            parts[f"{name}_u"] = loss_u.detach()
            if loss_s is not None:
                term = term + config.w_s * loss_s
                parts[f"{name}_s"] = loss_s.detach()
            contrastive = term if contrastive is None else contrastive + term
    if regularization is not None and reg_lambda > 0:
        total = total + reg_lambda * regularization
        parts["l1"] = regularization.detach()
    task = total
    if contrastive is not None:
        total = total + contrastive
    return (total, parts, task, contrastive) if split else (total, parts)
