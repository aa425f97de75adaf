"""Task heads: what differs between classification, regression and question answering in CAP training.

A head owns, for its task: the checks of the :class:`CAPConfig` against the task, reading the example ids
and labels of the training set, splitting a batch into model inputs / labels / ids, the logits of the model
outputs, the task loss, the KD loss, the labels the supervised contrastive term compares and the teacher
logits' cache width. :func:`task_head` chooses one from the model, once; ``CAPTrainer`` and
:func:`capsparse.cap.losses.cap_objective` only call it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .losses import QA_PAD_LOGIT, classification_loss, kd_loss, qa_kd_loss, qa_task_loss, regression_loss


def is_qa_model(model) -> bool:
    """True for extractive question-answering heads (``...ForQuestionAnswering``: start/end logits)."""
    return type(model).__name__.endswith("ForQuestionAnswering")


class ClassificationHead:
    """Sequence classification: CE on ``[B, C]`` logits, KD ``T^2 * KL``, class labels as contrastive labels."""

    name = "classification"
    missing_labels = "inputs: expected a 'labels' column for CAP training, found none"

    def __init__(self):
        self.w_s = 0.0

    # -- training data ---------------------------------------------------------------------------------
    def prepare(self, cfg, train_dataset) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Check ``cfg`` against the task and read ``train_dataset``: ``(ids, labels by id)``."""
        ids, labels = self.read_dataset(train_dataset)
        self.check_config(cfg)
        self.w_s = cfg.w_s
        return ids, labels

    def check_config(self, cfg) -> None:
        """Raise on CAP settings the task cannot use (the base task can use them all)."""

    def read_dataset(self, ds) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(ids, labels by id)``: the ``idx`` column (each id ``0..N-1`` once) and the task's labels."""
        cols = getattr(ds, "column_names", None)
        if cols is not None:
            if "idx" not in cols:
                raise ValueError(f"train_dataset: expected an 'idx' column (example id 0..N-1) for the CAP banks, "
                                 f"got columns {cols}; add it with dataset.map(lambda e, i: {{'idx': i}}, "
                                 f"with_indices=True)")
        else:
            first = ds[0]
            if "idx" not in first:
                raise ValueError(f"train_dataset: expected each example to have 'idx' (example id 0..N-1) for the "
                                 f"CAP banks, got keys {sorted(first)}")
        return self._read_labels(ds, cols)

    def _read_labels(self, ds, cols):
        if cols is not None:
            label_col = "labels" if "labels" in cols else "label" if "label" in cols else None
            if label_col is None:
                raise ValueError(f"train_dataset: expected a 'labels' column, got columns {cols}")
            ids = torch.as_tensor(list(ds["idx"]), dtype=torch.int64)
            labels = torch.as_tensor(list(ds[label_col]))
        else:
            ids = torch.as_tensor([int(ds[i]["idx"]) for i in range(len(ds))], dtype=torch.int64)
            labels = torch.as_tensor([ds[i]["labels"] if "labels" in ds[i] else ds[i]["label"]
                                      for i in range(len(ds))])
        _check_ids(ids)
        by_id = torch.empty_like(labels)
        by_id[ids] = labels
        return ids, by_id

    # -- batches ------------------------------------------------------------------------------------------
    def split(self, batch) -> tuple:
        """``(model inputs, labels, ids)``."""
        batch = dict(batch)
        ids = batch.pop("idx", None)
        labels = batch.pop("labels", None)
        if labels is None:
            labels = batch.pop("label", None)
        return batch, labels, ids

    def logits(self, outputs) -> torch.Tensor:
        return outputs["logits"] if isinstance(outputs, dict) else outputs[0]

    def cache_logits(self, logits: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The teacher logits as the per-example cache stores them."""
        return logits

    # -- losses -------------------------------------------------------------------------------------------
    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, labels)

    def kd_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(logits, teacher_logits.to(logits.device), temperature)

    def contrastive_labels(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """What the supervised positives compare (``None``: unsupervised positives only)."""
        return labels.long() if self.w_s > 0 else None


class RegressionHead(ClassificationHead):
    """Regression (``num_labels == 1``): MSE task and KD losses; supervised positives compare quantile bins of
    the targets (``regression_bins``), or there are none (``w_s = 0``)."""

    name = "regression"

    def __init__(self):
        super().__init__()
        self.bin_edges: Optional[torch.Tensor] = None

    def prepare(self, cfg, train_dataset):
        ids, labels = super().prepare(cfg, train_dataset)
        if cfg.use_cap and cfg.w_s > 0:
            qs = torch.linspace(0, 1, cfg.regression_bins + 1)[1:-1]
            self.bin_edges = torch.quantile(labels.float(), qs)
        return ids, labels

    def check_config(self, cfg) -> None:
        if cfg.use_cap and cfg.w_s > 0 and cfg.regression_bins is None:
            raise ValueError("w_s: supervised positives compare class labels, but this is a regression task "
                             "(num_labels == 1); set w_s=0, or regression_bins=<k> to bin the targets into "
                             "k quantile bins")

    def task_loss(self, logits, labels):
        return regression_loss(logits, labels)

    def kd_loss(self, logits, teacher_logits, temperature, attention_mask=None):
        return kd_loss(logits, teacher_logits.to(logits.device), temperature, regression=True)

    def contrastive_labels(self, labels):
        if self.w_s <= 0 or self.bin_edges is None:  # no bins without CAP: nothing compares them
            return None
        return torch.bucketize(labels.float().reshape(-1), self.bin_edges.to(labels.device), right=True)


class QuestionAnsweringHead(ClassificationHead):
    """Extractive QA (SQuAD): logits ``[B, L, 2]`` (start, end), labels ``[B, 2]`` (start, end positions); the
    task loss is the mean start/end CE, KD the mean start/end ``T^2 * KL`` over the real tokens, and the
    contrastive terms are unsupervised only. The teacher's start/end logits are cached at the training data's
    longest feature."""

    name = "question-answering"
    missing_labels = ("inputs: expected 'start_positions' and 'end_positions' columns for CAP training of a "
                      "question-answering model, found none")

    def __init__(self):
        super().__init__()
        self.width: Optional[int] = None

    def prepare(self, cfg, train_dataset):
        ids, labels = self.read_dataset(train_dataset)
        self.width = _max_length(train_dataset)
        self.check_config(cfg)
        return ids, labels

    def check_config(self, cfg) -> None:
        if cfg.use_cap and cfg.w_s > 0:
            raise ValueError(f"w_s: supervised positives compare class labels, but question answering has none; set "
                             f"w_s=0 (the 'squad-unstructured' / 'squad-structured' recipes do), got w_s={cfg.w_s}")
        if cfg.use_cap and cfg.representation == "pooler":
            raise ValueError("representation='pooler': question-answering models have no pooler; use 'cls' (the "
                             "official SQuAD representation, as the 'squad-*' recipes) or 'mean'")

    def _read_labels(self, ds, cols):
        """``labels`` is ``None``: start/end positions are not class labels (the columns must exist)."""
        if cols is not None:
            missing = [c for c in ("start_positions", "end_positions") if c not in cols]
            if missing:
                raise ValueError(f"train_dataset: a question-answering model needs {missing} columns (e.g. from "
                                 f"capsparse.data.prepare_train_features), got columns {cols}")
            return _check_ids(torch.as_tensor(list(ds["idx"]), dtype=torch.int64)), None
        first = ds[0]
        ids = torch.as_tensor([int(ds[i]["idx"]) for i in range(len(ds))], dtype=torch.int64)
        if "start_positions" not in first or "end_positions" not in first:
            raise ValueError(f"train_dataset: a question-answering model needs 'start_positions' and "
                             f"'end_positions', got keys {sorted(first)}")
        return _check_ids(ids), None

    def split(self, batch):
        """Labels ``[B, 2]`` (start, end positions)."""
        batch = dict(batch)
        ids = batch.pop("idx", None)
        start, end = batch.pop("start_positions", None), batch.pop("end_positions", None)
        labels = None if start is None or end is None else torch.stack([start.reshape(-1), end.reshape(-1)], 1)
        batch.pop("labels", None)
        batch.pop("label", None)
        return batch, labels, ids

    def logits(self, outputs):
        return torch.stack([outputs["start_logits"], outputs["end_logits"]], dim=-1)

    def cache_logits(self, logits, attention_mask):
        """A fixed width for the per-feature cache (batches are padded to different lengths)."""
        if attention_mask is not None:  # padding positions hold a constant: the cache does not depend on the batch
            logits = logits.masked_fill(~attention_mask.bool().unsqueeze(-1), QA_PAD_LOGIT)
        if logits.shape[1] < self.width:
            logits = F.pad(logits, (0, 0, 0, self.width - logits.shape[1]), value=QA_PAD_LOGIT)
        return logits[:, :self.width]

    def task_loss(self, logits, labels):
        return qa_task_loss(logits, labels)

    def kd_loss(self, logits, teacher_logits, temperature, attention_mask=None):
        return qa_kd_loss(logits, teacher_logits, temperature, attention_mask)

    def contrastive_labels(self, labels):
        return None


def task_head(model) -> ClassificationHead:
    """The head for ``model``: question answering (``...ForQuestionAnswering``), regression (``problem_type``
    "regression" or ``num_labels == 1``) or classification."""
    if is_qa_model(model):
        return QuestionAnsweringHead()
    if model.config.problem_type == "regression" or model.config.num_labels == 1:
        return RegressionHead()
    return ClassificationHead()


def check_teacher(teacher, model) -> None:
    """The teacher must solve the student's task: the same head kind and, for classification, the same labels."""
    if is_qa_model(teacher) != is_qa_model(model):
        raise ValueError(f"teacher: expected a {'question-answering' if is_qa_model(model) else 'classification'} "
                         f"model like the student ({type(model).__name__}), got {type(teacher).__name__}")
    if is_qa_model(model):
        return  # start/end logits over tokens: no label order to compare
    t, s = teacher.config, model.config
    if t.num_labels != s.num_labels:
        raise ValueError(f"teacher: expected num_labels={s.num_labels} (the student's), got {t.num_labels}; KD and "
                         f"FiC need a teacher fine-tuned on the same task")
    t_map = {str(k): int(v) for k, v in (getattr(t, "label2id", None) or {}).items()}
    s_map = {str(k): int(v) for k, v in (getattr(s, "label2id", None) or {}).items()}
    generic = lambda m: all(k == f"LABEL_{v}" for k, v in m.items())  # noqa: E731 (transformers' default names)
    if t_map and s_map and not generic(t_map) and not generic(s_map) and t_map != s_map:
        raise ValueError(f"teacher: label2id {t_map} does not match the student's {s_map}; the logits would be "
                         f"compared in a different label order (e.g. MNLI)")


def _max_length(ds) -> int:
    """The longest ``input_ids`` of the training data (the width of the teacher's start/end logit cache)."""
    cols = getattr(ds, "column_names", None)
    rows = ds["input_ids"] if cols is not None else (ds[i]["input_ids"] for i in range(len(ds)))
    return max(len(r) for r in rows)


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    n = ids.numel()
    if n == 0 or not torch.equal(torch.sort(ids).values, torch.arange(n)):
        raise ValueError(f"train_dataset: expected 'idx' to hold each example id 0..{n - 1} exactly once")
    return ids
