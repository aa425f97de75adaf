"""The run skeleton shared by finetune and prune: training arguments, console log, history and plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

from ..runlog import get_logger, process_rank, write_json

log = get_logger("app")


def training_arguments(o: Dict[str, Any], out: Path, learning_rate: float, n_train: int, remove_unused: bool = True,
                       eval_strategy: str = "no"):
    from transformers import TrainingArguments

    steps_per_epoch = max(1, math.ceil(n_train / o["batch_size"]))
    total = o["max_steps"] or max(1, math.ceil(steps_per_epoch * float(o["epochs"])))
    logging_steps = o.get("logging_steps") or max(1, total // 20)
    warmup = int(round((o.get("warmup_ratio") or 0.0) * total))
    kwargs = dict(
        output_dir=str(out / "trainer"), per_device_train_batch_size=o["batch_size"],
        per_device_eval_batch_size=o["eval_batch_size"], learning_rate=learning_rate,
        num_train_epochs=float(o["epochs"]), max_steps=o["max_steps"] or -1, warmup_steps=warmup,
        logging_steps=logging_steps, logging_first_step=True, save_strategy="no", report_to=[], seed=o["seed"],
        data_seed=o["seed"], disable_tqdm=False, remove_unused_columns=remove_unused, dataloader_num_workers=0,
        eval_strategy=eval_strategy, eval_steps=logging_steps if eval_strategy == "steps" else None,
    )
    if o.get("group_by_length"):
        kwargs["train_sampling_strategy"] = "group_by_length"
    import torch

    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    return TrainingArguments(**kwargs), total


class ConsoleLogCallback:
    """Mirror the Trainer's log dicts into the run log (the tqdm bar shows them on the console)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    log.debug("step %s: %s", state.global_step, json.dumps(
                        {k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()}))

        return _CB()


def save_history(trainer, out: Path, target_sparsity=None) -> List[str]:
    from ..plots import plot_run

    history = list(trainer.state.log_history)
    write_json(out / "log_history.json", history)
    return [str(p) for p in plot_run(history, out, target_sparsity=target_sparsity)]


def other_rank_result(command: str, trainer) -> Dict[str, Any]:
    """What a rank other than 0 returns after training: rank 0 alone evaluates and writes the run's files (the
    evaluation loop uses no collectives, so the other ranks only wait for it at the end of the command)."""
    return {"command": command, "rank": process_rank(), "train_steps": trainer.state.global_step,
            "note": "rank 0 evaluates and writes the run's files"}


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
