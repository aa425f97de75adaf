"""PNG plots of runs: sparsity schedule, losses (from ``trainer.state.log_history``), accuracy vs sparsity.

matplotlib runs with the non-interactive Agg backend; every function returns the written path (or
``None`` when there was nothing to plot).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

SPARSITY_KEYS = ("sparsity", "train_sparsity", "sparsity/global", "target_sparsity", "sparsity_target", "threshold")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, title: str, path: PathLike) -> Path:
    """Title, grid and legend, then save the figure to ``path`` (parents created) and close it."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(log_history: Sequence[dict], key: str):
    xs, ys = [], []
    for entry in log_history:
        if key in entry and "step" in entry and isinstance(entry[key], (int, float)):
            xs.append(entry["step"])
            ys.append(float(entry[key]))
    return xs, ys


_COMPONENT = re.compile(r"^(ce|kd|reg|l1|regularization|(prc|snc|fic)_(u|s))$")


def loss_keys(log_history: Sequence[dict]) -> List[str]:
    """Logged training-loss keys: ``loss``, any ``*loss*`` key and CAPTrainer's components (``ce``, ``kd``,
    ``prc_u``, ``snc_s``, ``fic_u``...), excluding eval losses and summary entries."""
    keys = []
    for entry in log_history:
        if "train_runtime" in entry:
            continue
        for k, v in entry.items():
            if k.startswith(("eval_", "train_")) or not isinstance(v, (int, float)):
                continue
            if ("loss" in k or _COMPONENT.match(k)) and k not in keys:
                keys.append(k)
    return keys


def plot_losses(log_history: Sequence[dict], path: PathLike, title: str = "training losses") -> Optional[Path]:
    keys = loss_keys(log_history)
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        xs, ys = _series(log_history, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=key, lw=2.2 if key == "loss" else 1.2)
    if len(keys) > 2:
        ax.set_yscale("symlog", linthresh=1e-2)  # CE/KD and contrastive terms differ by orders of magnitude
    evx, evy = _series(log_history, "eval_loss")
    if evx:
        ax.plot(evx, evy, "k--", marker="o", label="eval_loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    return _finish(plt, fig, ax, title, path)


def plot_sparsity(log_history: Sequence[dict], path: PathLike, target: Optional[float] = None,
                  title: str = "sparsity schedule") -> Optional[Path]:
    plotted = False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = []
    for entry in log_history:
        for k in entry:
            if k not in keys and ("sparsity" in k or k == "threshold") and not k.startswith("eval_"):
                keys.append(k)
    for key in keys:
        xs, ys = _series(log_history, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=key)
            plotted = True
    if target is not None:
        ax.axhline(target, color="grey", ls=":", label=f"target {target:.2f}")
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.02)
    return _finish(plt, fig, ax, title, path)


def plot_accuracy_vs_sparsity(rows: Iterable[Dict], path: PathLike, metric: str = "accuracy",
                              dense: Optional[float] = None, title: str = "accuracy vs sparsity",
                              dense_label: str = "dense teacher", majority: Optional[float] = None) -> Optional[Path]:
    """``rows``: dicts with ``method``, ``sparsity`` (fraction), ``mean`` and optional ``std`` (in the metric's
    unit). One line per method; error bars are the std over seeds. ``dense`` and ``majority`` (the score of
    predicting the most frequent class) are drawn as horizontal reference lines."""
    rows = [r for r in rows if r.get("mean") is not None and r.get("sparsity") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods: Dict[str, List[Dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    for method, rs in methods.items():
        rs = sorted(rs, key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in rs]
        ys = [r["mean"] for r in rs]
        es = [r.get("std") or 0.0 for r in rs]
        ls = "-" if method.lower().startswith("cap") else "--"
        ax.errorbar(xs, ys, yerr=es, marker="o", ls=ls, capsize=3, label=method)
    if dense is not None:
        ax.axhline(dense, color="black", ls=":", label=f"{dense_label} {dense:.1f}")
    if majority is not None:
        ax.axhline(majority, color="gray", ls="-.", lw=1, label=f"one class (majority) {majority:.1f}")
    ax.set_xlabel("encoder sparsity (%)")
    ax.set_ylabel(metric)
    return _finish(plt, fig, ax, title, path)


def plot_run(log_history: Sequence[dict], output_dir: PathLike, target_sparsity: Optional[float] = None) -> List[Path]:
    """Both per-run plots into ``output_dir`` (``losses.png``, ``sparsity.png``); returns the paths written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p in (plot_losses(log_history, out / "losses.png"),
              plot_sparsity(log_history, out / "sparsity.png", target=target_sparsity)):
        if p is not None:
            written.append(p)
    return written
