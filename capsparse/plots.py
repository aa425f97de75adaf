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


# one style per curve, so that curves with identical values stay visible on top of each other: line styles,
# markers and marker sizes all differ, later curves are drawn thinner and with hollow markers
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def curve_style(i: int, n_points: int) -> dict:
    """Matplotlib keyword arguments of the ``i``-th curve of a plot (``n_points`` long)."""
    return dict(ls=_LINESTYLES[i % len(_LINESTYLES)], marker=_MARKERS[i % len(_MARKERS)],
                markersize=max(3.0, 7.0 - 0.6 * i), lw=max(0.8, 2.2 - 0.25 * i),
                markevery=max(1, n_points // 15), fillstyle="full" if i % 2 == 0 else "none")


def run_title(what: str, run_name: Optional[str] = None, method: Optional[str] = None) -> str:
    """``"<what>: <run> (<method>)"``, leaving out what is unknown."""
    label = " ".join(x for x in (run_name, f"({method})" if method else None) if x)
    return f"{what}: {label}" if label else what


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
    for i, key in enumerate(keys):
        xs, ys = _series(log_history, key)
        if xs:
            ax.plot(xs, ys, label=key, **curve_style(i, len(xs)))
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
            if k not in keys and "sparsity" in k and not k.startswith("eval_"):
                keys.append(k)
    for i, key in enumerate(keys):
        xs, ys = _series(log_history, key)
        if xs:
            ax.plot(xs, ys, label=key, **curve_style(i, len(xs)))
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
    for i, (method, rs) in enumerate(methods.items()):
        rs = sorted(rs, key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in rs]
        ys = [r["mean"] for r in rs]
        es = [r.get("std") or 0.0 for r in rs]
        ax.errorbar(xs, ys, yerr=es, capsize=3, label=method, **curve_style(i, len(xs)))
    if dense is not None:
        ax.axhline(dense, color="black", ls=":", label=f"{dense_label} {dense:.1f}")
    if majority is not None:
        ax.axhline(majority, color="gray", ls="-.", lw=1, label=f"one class (majority) {majority:.1f}")
    ax.set_xlabel("encoder sparsity (%)")
    ax.set_ylabel(metric)
    return _finish(plt, fig, ax, title, path)


def _run_method(out: Path) -> Optional[str]:
    """The pruning method recorded in the run's ``config.json`` (``options.method``), if any."""
    from .runlog import CONFIG_FILE, read_json

    try:
        options = read_json(out / CONFIG_FILE).get("options") or {}
    except (OSError, ValueError, AttributeError):
        return None
    method = options.get("method") if isinstance(options, dict) else None
    return str(method) if method else None


def plot_run(log_history: Sequence[dict], output_dir: PathLike, target_sparsity: Optional[float] = None,
             run_name: Optional[str] = None, method: Optional[str] = None) -> List[Path]:
    """Both per-run plots into ``output_dir`` (``losses.png``, ``sparsity.png``); returns the paths written.

    Titles name the run (default: the directory's name) and the method (default: ``options.method`` of the run's
    ``config.json``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_name = run_name if run_name is not None else out.resolve().name
    method = method if method is not None else _run_method(out)
    written = []
    for p in (plot_losses(log_history, out / "losses.png", title=run_title("training losses", run_name, method)),
              plot_sparsity(log_history, out / "sparsity.png", target=target_sparsity,
                            title=run_title("sparsity schedule", run_name, method))):
        if p is not None:
            written.append(p)
    return written
