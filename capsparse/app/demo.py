"""``capsparse demo``: teacher -> CAP-m and movement at the same budget -> eval, export, table."""
from __future__ import annotations

import collections
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..runlog import RunDir, get_logger, machine_info
from .commands import finetune, prune
from .options import OptionError, resolve
from .run import clear_if_overwrite
from .tasks import load_split

log = get_logger("app")


FULL_RECIPE_HINT = """\
Full-size recipe (BERT-base, GPU; the paper's settings, docs/cap.md):
  capsparse finetune --model bert-base-uncased --task mnli --epochs 3 --max-length 128 --output-dir runs/mnli-teacher
  capsparse prune --model bert-base-uncased --teacher runs/mnli-teacher/model --task mnli --recipe glue-unstructured \\
      --method movement --cap --sparsity 0.97 --epochs 10 --batch-size 32 --max-length 128 \\
      --output-dir runs/mnli-capm-97
(needs the MNLI files in --glue-dir; paper target: CAP at 97% keeps 96.3% of BERT-base on MNLI, about 80-81 m-acc)"""


def _fmt_mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n is not None else "-"


def demo(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Teacher -> CAP-m and movement at the same budget -> eval, export, table. See ``capsparse demo --help``."""
    o = resolve(options, "demo", **overrides)
    quick = bool(o.get("quick"))
    out = Path(o["output_dir"] or "runs/demo")
    _fresh_output_dir(out, o)
    run = RunDir(out, command="demo", sticky=True)
    # the budget and learning rate are resolve()'s (options.DEMO_*), the same from the CLI and from Python
    n_train, teacher_steps, prune_steps = o["train_examples"], o["teacher_steps"], o["prune_steps"]
    n_eval, lr = o["max_eval_examples"], o["learning_rate"]
    o.update(output_dir=str(out))
    run.write_config(o)
    started = time.perf_counter()
    common = dict(task="sst2", glue_dir=o["glue_dir"], model=o["model"], max_length=o["max_length"],
                  batch_size=o["batch_size"], eval_batch_size=o["eval_batch_size"], max_train_examples=n_train,
                  max_eval_examples=n_eval, seed=o["seed"], logging_steps=max(1, min(teacher_steps, prune_steps) // 15),
                  group_by_length=True)
    log.info("demo: SST-2, %d train examples, max_length %d, teacher %d steps, pruning %d steps per method, "
             "sparsity %.2f", n_train, o["max_length"], teacher_steps, prune_steps, o["sparsity"])
    t0 = time.perf_counter()
    teacher = finetune(common, output_dir=str(out / "teacher"), max_steps=teacher_steps, learning_rate=lr)
    teacher_wall = time.perf_counter() - t0
    rows = [dict(method="dense teacher", sparsity=0.0, accuracy=teacher["eval"]["accuracy"],
                 bytes=None, wall=teacher_wall)]
    # the teacher as a compressed (dense) export, for the size column
    from ..export import export_compressed, load_any

    tmodel, ttok = load_any(teacher["model_dir"])
    tmeta = export_compressed(tmodel, out / "teacher" / "compressed", tokenizer=ttok)
    rows[0]["bytes"] = tmeta["file_bytes"]
    results = {"teacher": teacher}
    for label, cap in (("CAP-m", True), ("movement", False)):
        run_dir = out / ("cap-m" if cap else "movement")
        t0 = time.perf_counter()
        student = teacher["model_dir"] if o["student_init"] == "teacher" else o["model"]
        res = prune(dict(common, model=student), output_dir=str(run_dir), teacher=teacher["model_dir"],
                    method="movement", cap=cap,
                    sparsity=o["sparsity"], max_steps=prune_steps, learning_rate=lr, recipe="glue-unstructured",
                    cap_options=o.get("cap_options"))
        rows.append(dict(method=label, sparsity=res["sparsity"], accuracy=res["eval"]["accuracy"],
                         bytes=res["export_bytes"], wall=time.perf_counter() - t0))
        results[label] = res
    total = time.perf_counter() - started
    majority = _majority_share(ttok, o, n_eval)
    for r in rows:
        r["vs_majority"] = None if majority is None else r["accuracy"] - majority
    cap_gain = rows[1]["accuracy"] - rows[2]["accuracy"]
    table = demo_table(rows, majority, cap_gain)
    (out / "demo_table.md").write_text(table + "\n")
    collapsed = [r["method"] for r in rows[1:] if r["vs_majority"] is not None and r["vs_majority"] < 0.01]
    run.update_metrics(command="demo", rows=rows, wall_seconds=total, cpu_seconds=time.process_time(), quick=quick,
                       majority_share=majority, cap_minus_baseline=cap_gain, collapsed=collapsed,
                       machine=machine_info(),
                       budget=dict(train_examples=n_train, teacher_steps=teacher_steps, prune_steps=prune_steps,
                                   max_length=o["max_length"], batch_size=o["batch_size"], eval_examples=n_eval))
    print()
    print(table)
    print(f"\ndemo wall time: {total / 60:.1f} min (CPU time {time.process_time() / 60:.1f} min); runs in {out}/ "
          f"(config.json, metrics.json, run.log, PNG plots, compressed exports)")
    if quick:
        print("(--quick: a smoke run, the numbers are not meaningful)", file=sys.stderr)
    if collapsed:
        print(f"\nWARNING: {' and '.join(collapsed)} scored within 1 point of the majority-class share of these dev "
              f"examples ({100 * majority:.2f}%): the student predicts one class. Report this with the run "
              f"directory {out}/ (metrics.json, run.log).", file=sys.stderr)
    print("\n" + FULL_RECIPE_HINT)
    return {"rows": rows, "wall_seconds": total, "results": results}


def _fresh_output_dir(out: Path, o: Dict[str, Any]) -> None:
    """The demo writes three runs under ``out``: refuse an earlier one unless ``--overwrite`` replaces it."""
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not o.get("overwrite"):
        raise OptionError(f"--output-dir: {out} is not empty (an earlier demo?); pass --overwrite to replace it, or "
                          f"choose a new directory")
    if not (out / "config.json").is_file():
        raise OptionError(f"--overwrite: {out} is not a capsparse demo directory (no config.json); refusing to "
                          f"delete it")
    clear_if_overwrite(out, o)


def demo_table(rows, majority: Optional[float], cap_gain: float) -> str:
    """The demo's markdown table: accuracy against the majority class, and the CAP - baseline difference."""
    def vs(r):
        return "-" if r.get("vs_majority") is None else f"{100 * r['vs_majority']:+.2f}"

    lines = ["| method | sparsity | SST-2 dev acc | vs majority class | file size | wall time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['sparsity']:.1f}% | {100 * r['accuracy']:.2f} | {vs(r)} | "
                     f"{_fmt_mb(r['bytes'])} | {r['wall']:.0f} s |")
    share = "unknown (dev labels not readable)" if majority is None else f"{100 * majority:.2f}%"
    lines += ["", f"Majority-class share of the evaluated dev examples: {share}.",
              f"CAP - baseline (CAP-m minus movement, same budget and seed): {100 * cap_gain:+.2f} points."]
    return "\n".join(lines)


def _majority_share(tokenizer, o, n_eval) -> Optional[float]:
    """Share of the most frequent label among the evaluated SST-2 dev examples (None if they cannot be read)."""
    try:
        labels = load_split("sst2", tokenizer, "validation", glue_dir=o["glue_dir"], max_length=o["max_length"],
                            max_examples=n_eval, seed=o["seed"])["labels"]
    except Exception:  # noqa: BLE001 - only a hint in the demo's printout
        return None
    if not len(labels):
        return None
    counts = collections.Counter(int(x) for x in labels)
    return max(counts.values()) / len(labels)
