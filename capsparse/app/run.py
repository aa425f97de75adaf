"""The run skeleton shared by finetune and prune: the run directory (new, replaced with --overwrite, or continued
with --resume), training arguments, checkpoints and resume, the console log, history, plots and metrics.

A run directory holds ``config.json`` (the resolved options), ``run.log``, ``checkpoints/checkpoint-N`` (with
``--save-steps``; each made atomic by a manifest written last), then ``log_history.json``, PNG plots, the model
files and ``metrics.json`` (written last: a run with ``metrics.json`` is finished).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..distributed import is_main_process, rank
from ..runlog import CONFIG_FILE, METRICS_FILE, RunDir, get_logger, read_json, write_json
from .options import OptionError, default_output_dir

log = get_logger("app")

CHECKPOINTS = "checkpoints"
#: options that may change between a run and its --resume (they do not change what is computed)
RESUME_FREE = ("command", "resume", "overwrite", "threads", "save_steps", "output_dir", "debug", "config")


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def plan_run(o: Dict[str, Any], command: str, name: str, label: Optional[str] = None) -> Path:
    """The run directory of ``o`` (``o["output_dir"]``, else ``runs/<command>[-label]-<name>-<time>``; set in
    ``o``), checked but not touched: with ``--resume`` its ``config.json`` must hold the same options. Call it
    before loading anything, and :func:`open_run` once the models are loaded, so that a bad input leaves no run
    directory behind."""
    out = Path(o["output_dir"] or default_output_dir(f"{command}-{label}" if label else command, name))
    o["output_dir"] = str(out)
    if o.get("resume"):
        _check_resumable(out, o)
    return out


def open_run(o: Dict[str, Any], command: str, **extra: Any) -> RunDir:
    """Create (with ``--overwrite``: replace) or reopen (``--resume``) the planned run directory; a new run gets
    its ``config.json``."""
    out = Path(o["output_dir"])
    if not o.get("resume"):
        clear_if_overwrite(out, o)
    run = RunDir(out, command=command)
    if not o.get("resume"):
        run.write_config(o, **extra)
    return run


def clear_if_overwrite(out: Path, o: Dict[str, Any]) -> None:
    """With ``--overwrite``, remove ``out`` whole before anything is written to it (options.py has checked that it
    is a capsparse run directory or export); rank 0 alone writes a run's files."""
    if o.get("overwrite") and out.exists() and is_main_process():
        shutil.rmtree(out)


def _check_resumable(out: Path, o: Dict[str, Any]) -> None:
    if (out / METRICS_FILE).is_file():
        raise OptionError(f"--resume: {out} is a finished run (it has metrics.json); pass --overwrite to run it again")
    try:
        before = read_json(out / CONFIG_FILE).get("options", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise OptionError(f"--resume: cannot read {out / CONFIG_FILE} ({type(exc).__name__})") from None
    now = _comparable(o)
    changed = [k for k in sorted(set(before) | set(now)) if k not in RESUME_FREE and before.get(k) != now.get(k)]
    if changed:
        detail = ", ".join(f"{k} (run {before.get(k)!r}, now {now.get(k)!r})" for k in changed[:3])
        more = f" and {len(changed) - 3} more ({', '.join(changed[3:])})" if len(changed) > 3 else ""
        raise OptionError(f"--resume: the options differ from {out / CONFIG_FILE}: {detail}{more}; resume with "
                          f"the run's options")


def training_arguments(o: Dict[str, Any], out: Path, n_train: int, remove_unused: bool = True):
    """``(TrainingArguments, total steps)`` of resolved options; checkpoints go to ``out/checkpoints``."""
    from transformers import TrainingArguments

    steps_per_epoch = max(1, math.ceil(n_train / o["batch_size"]))
    total = o["max_steps"] or max(1, math.ceil(steps_per_epoch * float(o["epochs"])))
    logging_steps = o.get("logging_steps") or max(1, total // 20)
    warmup = int(round((o.get("warmup_ratio") or 0.0) * total))
    eval_strategy = "steps" if o.get("eval_during_training") else "no"
    save = o.get("save_steps")
    kwargs = dict(
        output_dir=str(out / CHECKPOINTS), per_device_train_batch_size=o["batch_size"],
        per_device_eval_batch_size=o["eval_batch_size"], learning_rate=o["learning_rate"],
        weight_decay=o.get("weight_decay") or 0.0,
        num_train_epochs=float(o["epochs"]), max_steps=o["max_steps"] or -1, warmup_steps=warmup,
        logging_steps=logging_steps, logging_first_step=True, report_to=[], seed=o["seed"],
        save_strategy="steps" if save else "no", save_steps=save or 500, save_total_limit=2 if save else None,
        data_seed=o["seed"], disable_tqdm=False, remove_unused_columns=remove_unused, dataloader_num_workers=0,
        eval_strategy=eval_strategy, eval_steps=logging_steps if eval_strategy == "steps" else None,
    )
    if o.get("group_by_length"):
        kwargs["train_sampling_strategy"] = "group_by_length"
    import torch

    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    return TrainingArguments(**kwargs), total


def run_callbacks(checkpoints: bool) -> list:
    """The console log mirror, then (last, after every other on_save) the atomic-checkpoint manifest writer."""
    callbacks = [ConsoleLogCallback()]
    if checkpoints:
        from ..checkpoint import AtomicCheckpointCallback

        callbacks.append(AtomicCheckpointCallback())
    return callbacks


def train(trainer, o: Dict[str, Any], run: RunDir):
    """``trainer.train()``, from the newest valid checkpoint with ``--resume`` (from step 0 when there is none)."""
    checkpoint: Optional[str] = None
    if o.get("resume"):
        from ..checkpoint import resolve_resume_checkpoint

        checkpoint = resolve_resume_checkpoint(run.path / CHECKPOINTS, True)
        if checkpoint is None:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.path / CHECKPOINTS)
        else:
            log.info("--resume: continuing from %s", checkpoint)
    out = trainer.train(resume_from_checkpoint=checkpoint)
    ckpt_dir = run.path / CHECKPOINTS
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
    return out


class ConsoleLogCallback:
    """Mirror the Trainer's log dicts into the run log (the tqdm bar shows them on the console)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:  # full precision: a learning rate of 3.3e-06 must not read 0.0
                    log.debug("step %s: %s", state.global_step, json.dumps(logs, default=str))

        return _CB()


def finish_run(run: RunDir, trainer, train_out, started: float, plot_target=None, **metrics: Any) -> Dict[str, Any]:
    """History, plots and ``metrics.json`` (last) with what every training run reports."""
    from ..plots import plot_run

    history = list(trainer.state.log_history)
    write_json(run.path / "log_history.json", history)
    plots = [str(p) for p in plot_run(history, run.path, target_sparsity=plot_target)]
    return run.update_metrics(**metrics, train_loss=train_out.training_loss, train_steps=trainer.state.global_step,
                              wall_seconds=time.perf_counter() - started, cpu_seconds=time.process_time(),
                              plots=plots)


def other_rank_result(command: str, trainer) -> Dict[str, Any]:
    """What a rank other than 0 returns after training: rank 0 alone evaluates and writes the run's files (the
    evaluation loop uses no collectives, so the other ranks only wait for it at the end of the command)."""
    return {"command": command, "rank": rank(), "train_steps": trainer.state.global_step,
            "note": "rank 0 evaluates and writes the run's files"}


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def untimed(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """``metrics`` without wall-clock values (for files that must be byte-identical across reruns)."""
    return {k: v for k, v in metrics.items() if k not in ("eval_seconds", "examples_per_second")}

