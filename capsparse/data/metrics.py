"""GLUE metrics in plain numpy (no scikit-learn / scipy at runtime).

Each matches its scikit-learn / scipy counterpart (tested): ``accuracy`` (accuracy_score), ``f1`` (binary
f1_score, positive class 1, 0.0 when undefined), ``matthews_corrcoef`` (matthews_corrcoef, multiclass form,
0.0 when undefined), ``pearson`` (scipy.stats.pearsonr, nan for constant input), ``spearman``
(scipy.stats.spearmanr: Pearson on average ranks, ties averaged).
"""

from __future__ import annotations

from typing import Dict

import numpy as np

_TASK_METRICS = {
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "rte": ("accuracy",),
    "cola": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
    "qnli": ("accuracy",),
    "mnli": ("accuracy",),
    "mnli-mm": ("accuracy",),
    "qqp": ("accuracy", "f1"),
}


def _task_name(task) -> str:
    # Resolve aliases through the registry (same package, light import: glue.py imports datasets lazily).
    from .glue import get_glue_task

    return get_glue_task(task).name


def accuracy(predictions, labels) -> float:
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    _check_same_length(p, y)
    if p.size == 0:
        return float("nan")
    return float(np.mean(p == y))


def f1(predictions, labels, pos_label=1) -> float:
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    _check_same_length(p, y)
    tp = float(np.sum((p == pos_label) & (y == pos_label)))
    fp = float(np.sum((p == pos_label) & (y != pos_label)))
    fn = float(np.sum((p != pos_label) & (y == pos_label)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(predictions, labels) -> float:
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    _check_same_length(p, y)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inv[: len(y)], inv[len(y):]
    c = np.zeros((k, k), dtype=np.float64)
    np.add.at(c, (yi, pi), 1.0)
    t_sum = c.sum(axis=1)
    p_sum = c.sum(axis=0)
    n_correct = np.trace(c)
    n = c.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(x, y) -> float:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    _check_same_length(a, b)
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    r = float(np.dot(a / na, b / nb))
    return max(-1.0, min(1.0, r))


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    n = a.size
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    # start of each run of equal values
    is_new = np.empty(n, dtype=bool)
    if n:
        is_new[0] = True
        is_new[1:] = sa[1:] != sa[:-1]
    run_id = np.cumsum(is_new) - 1
    starts = np.flatnonzero(is_new)
    ends = np.append(starts[1:], n)  # exclusive
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    _check_same_length(a, b)
    return pearson(rankdata(a), rankdata(b))


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"predictions and labels differ in length: {a.shape[0]} vs {b.shape[0]}")


def task_metric_names(task) -> tuple:
    return _TASK_METRICS[_task_name(task)]


def main_metric(task) -> str:
    """The single number to select/report a task by: ``accuracy`` (SST-2, RTE, QNLI, MNLI),
    ``matthews_correlation`` (CoLA), ``combined_score`` (mean of accuracy/F1 for MRPC and QQP, of
    Pearson/Spearman for STS-B, as the GLUE leaderboard averages them)."""
    names = task_metric_names(task)
    return names[0] if len(names) == 1 else "combined_score"


def compute_glue_metrics(task, predictions, labels) -> Dict[str, float]:
    """Metrics of one GLUE task. ``predictions`` are class ids, or logits ``[n, num_labels]`` (argmax is taken);
    for STS-B scores ``[n]`` or ``[n, 1]``. Returns the task's metrics plus ``combined_score`` (their mean)."""
    name = _task_name(task)
    p = np.asarray(predictions)
    y = np.asarray(labels)
    out: Dict[str, float] = {}
    if name == "stsb":
        p = p.astype(np.float64).reshape(-1)
        y = y.astype(np.float64).reshape(-1)
        out["pearson"] = pearson(p, y)
        out["spearmanr"] = spearman(p, y)
    else:
        if p.ndim == 2:
            p = p.argmax(axis=-1)
        p = p.reshape(-1)
        y = y.reshape(-1)
        if np.issubdtype(p.dtype, np.floating):
            p = p.astype(np.int64)
        for m in _TASK_METRICS[name]:
            if m == "accuracy":
                out[m] = accuracy(p, y)
            elif m == "f1":
                out[m] = f1(p, y)
            elif m == "matthews_correlation":
                out[m] = matthews_corrcoef(p, y)
    out["combined_score"] = float(np.mean(list(out.values())))
    return out

