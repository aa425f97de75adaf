"""End-to-end flows behind the CLI: finetune, prune, evaluate, export, predict, demo.

Each flow takes a plain options dict (the CLI's parsed flags), writes a run directory (``config.json``,
``metrics.json``, ``run.log``, PNG plots, model files) and returns its metrics dict. They can be called
from Python as well, e.g. ``prune({"task": "sst2", "method": "movement", "cap": True, "sparsity": 0.9,
"teacher": "runs/teacher/model", "output_dir": "runs/capm"})``.

``task="squad"`` (SQuAD v1.1) runs ``finetune`` / ``prune`` / ``evaluate`` on a ``...ForQuestionAnswering``
model: training features are question/context windows (``max_length``, ``doc_stride``, ``max_query_length``), one
CAP bank row per feature; evaluation post-processes start/end logits into answers and reports the official
``exact_match`` and ``f1`` (0-100). The data comes from ``squad_train_file`` / ``squad_dev_file``, else
``squad_dir`` / ``$CAPSPARSE_SQUAD_DIR`` / ``../shared/squad`` (``train-v1.1.json``, ``dev-v1.1.json``), else
the hub when reachable; otherwise a FileNotFoundError names where it looked, before any model is loaded.
"""
from __future__ import annotations

import collections

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .data.squad import is_squad_task
from .runlog import RunDir, get_logger, machine_info, process_rank, write_json

log = get_logger("pipeline")

# defaults shared by the CLI and direct calls
DEFAULTS: Dict[str, Any] = dict(
    task="sst2", glue_dir=None, model="default", max_length=None, batch_size=None, eval_batch_size=64,
    max_train_examples=None, max_eval_examples=None, epochs=3.0, max_steps=None, learning_rate=None,
    warmup_ratio=None, logging_steps=None, eval_during_training=False, group_by_length=False, seed=42,
    output_dir=None, threads=None,
    teacher=None, method=None, cap=None, sparsity=None, block_size=None, recipe=None,
    cap_options=None, cap_option=None, split="validation", fp16=False,
    squad_dir=None, squad_train_file=None, squad_dev_file=None, doc_stride=128, max_query_length=64,
)

# task-dependent defaults (None above): GLUE as the official GLUE scripts, SQuAD as run_squad_*.sh
GLUE_MAX_LENGTH, GLUE_BATCH_SIZE = 128, 32
SQUAD_MAX_LENGTH, SQUAD_BATCH_SIZE = 384, 16
def default_recipe(task, method=None) -> str:
    """``glue-unstructured`` / ``squad-unstructured``, or ``*-structured`` for ``method="first-order"``."""
    kind = "structured" if method == "first-order" else "unstructured"
    return f"{'squad' if is_squad_task(task) else 'glue'}-{kind}"


def _opts(options: Optional[Dict[str, Any]], **overrides) -> Dict[str, Any]:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (options or {}).items()})
    out.update(overrides)
    if out.get("cap_options") is None and out.get("cap_option"):
        from .cli import parse_cap_options

        out["cap_options"] = parse_cap_options(out["cap_option"])
    squad = is_squad_task(out.get("task"))
    if out.get("max_length") is None:
        out["max_length"] = SQUAD_MAX_LENGTH if squad else GLUE_MAX_LENGTH
    if out.get("batch_size") is None:
        out["batch_size"] = SQUAD_BATCH_SIZE if squad else GLUE_BATCH_SIZE
    if out.get("recipe") is None:
        out["recipe"] = default_recipe(out.get("task"), out.get("method"))
    return out


def _default_output_dir(command: str, task: Optional[str]) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{command}-{task or 'model'}-{stamp}")


@dataclasses.dataclass(frozen=True)
class SquadTask:
    """SQuAD v1.1 as a task (the GLUE flows use :class:`capsparse.data.GlueTask`)."""

    name: str = "squad"
    num_labels: int = 2  # start / end logits per token (the QA head's width)
    label_names: tuple = ()
    is_regression: bool = False
    main_metric: str = "f1"


def _task(task):
    if is_squad_task(task):
        return SquadTask()
    from .data import get_glue_task

    return get_glue_task(task)


# -- SQuAD data ----------------------------------------------------------------------------------------------

def squad_split(split: str) -> str:
    """``"train"`` or ``"validation"`` (aliases dev / val / valid / eval); ValueError otherwise."""
    from .data.squad import _SPLIT_ALIASES, SQUAD_FILES

    name = _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    if name not in SQUAD_FILES:
        raise ValueError(f"unknown SQuAD split {split!r}; expected one of train, validation (dev)")
    return name


def squad_source(o: Dict[str, Any], split: str) -> Optional[Path]:
    """The SQuAD-format JSON for ``split``: ``squad_train_file`` / ``squad_dev_file``, else the first of
    ``squad_dir`` > ``$CAPSPARSE_SQUAD_DIR`` > ``../shared/squad`` holding ``train-v1.1.json`` / ``dev-v1.1.json``;
    ``None`` means the hub (reachable). Raises FileNotFoundError naming where it looked when there is neither."""
    from .data.glue import hub_offline
    from .data.squad import missing_squad_error, resolve_squad_file

    split = squad_split(split)
    flag = "--squad-train-file" if split == "train" else "--squad-dev-file"
    explicit = o.get("squad_train_file") if split == "train" else o.get("squad_dev_file")
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"{flag}: SQuAD file {explicit} does not exist")
        return Path(explicit)
    found = resolve_squad_file(split, o.get("squad_dir"))
    if found is not None:
        return found
    if hub_offline():
        raise missing_squad_error(split, o.get("squad_dir"))
    log.warning("SQuAD %s not found locally; loading rajpurkar/squad from the hub", split)
    return None


def load_squad_split(tokenizer, o: Dict[str, Any], split: str, source: Optional[Path], max_examples=None,
                     train: bool = False):
    """``(examples, features)`` of a SQuAD split: training features (with ``idx``) or evaluation features."""
    from .data.squad import load_squad, squad_eval_features, squad_train_features

    examples = load_squad(squad_split(split), path=source, squad_dir=o.get("squad_dir"), max_examples=max_examples,
                          seed=o["seed"])
    kwargs = dict(max_length=o["max_length"], doc_stride=o["doc_stride"], max_query_length=o["max_query_length"])
    features = (squad_train_features if train else squad_eval_features)(examples, tokenizer, **kwargs)
    return examples, features


def _check_squad_options(o: Dict[str, Any]) -> None:
    if o.get("eval_during_training"):
        raise ValueError("--eval-during-training: not available for --task squad (exact match / F1 need the "
                         "answer post-processing); the dev set is evaluated at the end of the run")
    if not 0 <= int(o["doc_stride"]) < int(o["max_length"]):
        raise ValueError(f"--doc-stride: got {o['doc_stride']}, expected 0 <= doc stride < --max-length "
                         f"({o['max_length']})")


# -- data ------------------------------------------------------------------------------------------------------

def load_split(task, tokenizer, split: str, glue_dir=None, max_length: int = 128, max_examples=None, seed: int = 0,
               cache_dir=None):
    """Tokenised GLUE split (no padding; a collator pads each batch dynamically)."""
    from .data import load_glue, tokenize_dataset

    raw = load_glue(task, split, glue_dir=glue_dir, max_examples=max_examples, seed=seed)
    return tokenize_dataset(raw, tokenizer, task, max_length=max_length, cache_dir=cache_dir)


def make_collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)


def make_compute_metrics(task):
    from .data.metrics import compute_glue_metrics

    def compute(eval_pred):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        return compute_glue_metrics(_task(task).name, preds, labels)

    return compute


def _length_sorted_outputs(model, tokenizer, dataset, batch_size: int, desc: str, rows_of):
    """Run ``model`` over a tokenised dataset in batches of similar length (little padding; tqdm bar).

    ``rows_of(output)`` turns one batch's model output into per-example rows; returns ``(rows in dataset order,
    token lengths, seconds)``."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    collator = make_collator(tokenizer)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    inputs = dataset.select_columns(cols)
    lengths = [len(x) for x in inputs["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    rows = [None] * len(order)
    model.eval()
    start = time.perf_counter()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            idx = order[i:i + batch_size].tolist()
            batch = {k: v.to(device) for k, v in collator([inputs[j] for j in idx]).items()}
            for j, row in zip(idx, rows_of(model(**batch))):
                rows[j] = row
    return rows, lengths, time.perf_counter() - start


def evaluate_model(model, tokenizer, dataset, task, batch_size: int = 64, desc: str = "eval") -> Dict[str, Any]:
    """Metrics of ``model`` on a tokenised dataset (own loop with a tqdm bar; batches sorted by length)."""
    import numpy as np

    from .data.metrics import compute_glue_metrics, main_metric

    t = _task(task)
    rows, _, elapsed = _length_sorted_outputs(model, tokenizer, dataset, batch_size, desc,
                                              lambda out: out.logits.float().cpu().numpy())
    logits = np.stack(rows) if rows else np.zeros((0, t.num_labels))
    labels = np.asarray(dataset["labels"])
    preds = logits.reshape(-1) if t.is_regression else logits.argmax(-1)
    metrics = compute_glue_metrics(t.name, logits if not t.is_regression else preds, labels)
    metrics.update(main_metric=main_metric(t.name), num_examples=int(len(labels)), eval_seconds=elapsed,
                   examples_per_second=len(labels) / elapsed if elapsed > 0 else None)
    return metrics


def evaluate_squad(model, tokenizer, examples, features, batch_size: int = 64, desc: str = "eval",
                   n_best: int = 20, max_answer_length: int = 30, predictions_path=None) -> Dict[str, Any]:
    """SQuAD v1.1 ``exact_match`` / ``f1`` (0-100, official evaluator) of a QA model on evaluation ``features``
    (from ``squad_eval_features``): start/end logits per feature (batches sorted by length), then
    :func:`capsparse.data.postprocess_predictions` over each example's windows. ``predictions_path``: also write
    ``{question id: answer}`` there as JSON."""
    from .data.squad import postprocess_predictions, squad_metrics

    def start_end(out):
        return zip(out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy())

    rows, lengths, elapsed = _length_sorted_outputs(model, tokenizer, features, batch_size, desc, start_end)
    starts = [s[:n] for (s, _), n in zip(rows, lengths)]
    ends = [e[:n] for (_, e), n in zip(rows, lengths)]
    predictions = postprocess_predictions(examples, features, starts, ends, n_best=n_best,
                                          max_answer_length=max_answer_length)
    metrics: Dict[str, Any] = dict(squad_metrics(predictions, examples))
    metrics.update(main_metric="f1", num_examples=int(len(examples)), num_features=int(len(features)),
                   eval_seconds=elapsed, examples_per_second=len(examples) / elapsed if elapsed > 0 else None)
    if predictions_path is not None:
        write_json(predictions_path, predictions)
    return metrics


def _evaluate(t, model, tokenizer, dev, o: Dict[str, Any], desc: str, out: Optional[Path] = None):
    """GLUE metrics on a tokenised dataset, or SQuAD EM/F1 on ``(examples, features)``."""
    if is_squad_task(t):
        examples, features = dev
        return evaluate_squad(model, tokenizer, examples, features, o["eval_batch_size"], desc=desc,
                              predictions_path=None if out is None else out / "predictions.json")
    return evaluate_model(model, tokenizer, dev, t.name, o["eval_batch_size"], desc=desc)


def _load_model(t, model: str):
    """The student / dense model and its tokenizer: a QA model for SQuAD, a classifier for GLUE."""
    from .models import load_default

    if is_squad_task(t):
        return load_default(model=model, question_answering=True)
    net, tokenizer = load_default(t.num_labels, model=model)
    if t.label_names:
        net.config.id2label = dict(t.id2label)
        net.config.label2id = dict(t.label2id)
    return net, tokenizer


def _load_train_dev(t, tokenizer, o: Dict[str, Any], sources=None):
    """``(train, dev, description)``: SQuAD gives training features and ``(dev examples, dev features)``."""
    if is_squad_task(t):
        train_ex, train = load_squad_split(tokenizer, o, "train", sources["train"], o["max_train_examples"],
                                           train=True)
        dev_ex, dev_feats = load_squad_split(tokenizer, o, "validation", sources["validation"],
                                             o["max_eval_examples"])
        desc = (f"{len(train)} train features ({len(train_ex)} questions) / {len(dev_feats)} dev features "
                f"({len(dev_ex)} questions), doc_stride {o['doc_stride']}")
        return train, (dev_ex, dev_feats), desc
    train = load_split(t.name, tokenizer, "train", o["glue_dir"], o["max_length"], o["max_train_examples"], o["seed"])
    dev = load_split(t.name, tokenizer, "validation", o["glue_dir"], o["max_length"], o["max_eval_examples"], o["seed"])
    return train, dev, f"{len(train)} train / {len(dev)} dev examples"


def _squad_sources(t, o: Dict[str, Any], splits=("train", "validation")):
    """Locate the SQuAD files first (fails fast, before any model is loaded); ``None`` for GLUE."""
    if not is_squad_task(t):
        return None
    _check_squad_options(o)
    return {squad_split(s): squad_source(o, s) for s in splits}


# -- training arguments ---------------------------------------------------------------------------------------

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


class _ConsoleLogCallback:
    """Mirror the Trainer's log dicts into the run log (the tqdm bar shows them on the console)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    log.debug("step %s: %s", state.global_step, json.dumps(
                        {k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()}))

        return _CB()


def _save_history(trainer, out: Path, target_sparsity=None) -> List[str]:
    from .plots import plot_run

    history = list(trainer.state.log_history)
    write_json(out / "log_history.json", history)
    return [str(p) for p in plot_run(history, out, target_sparsity=target_sparsity)]


def _other_rank_result(command: str, trainer) -> Dict[str, Any]:
    """What a rank other than 0 returns after training: rank 0 alone evaluates and writes the run's files (the
    evaluation loop uses no collectives, so the other ranks only wait for it at the end of the command)."""
    return {"command": command, "rank": process_rank(), "train_steps": trainer.state.global_step,
            "note": "rank 0 evaluates and writes the run's files"}


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# -- finetune --------------------------------------------------------------------------------------------------

def finetune(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Fine-tune a dense model (a KD teacher, or the dense reference). Saves ``<output_dir>/model``."""
    from transformers import Trainer

    o = _opts(options, **overrides)
    t = _task(o["task"])
    squad = is_squad_task(t)
    sources = _squad_sources(t, o)
    out = Path(o["output_dir"] or _default_output_dir("finetune", t.name))
    run = RunDir(out, command="finetune")
    o["output_dir"] = str(out)
    run.write_config(o)
    _seed(o["seed"])
    started = time.perf_counter()
    model, tokenizer = _load_model(t, o["model"])
    train, dev, data_desc = _load_train_dev(t, tokenizer, o, sources)
    lr = o["learning_rate"] or 5e-5
    args, total = training_arguments(o, out, lr, len(train),
                                     eval_strategy="steps" if o["eval_during_training"] else "no")
    log.info("finetune %s: %s, %d steps, lr %g, batch %d, max_length %d", t.name, data_desc, total, lr,
             o["batch_size"], o["max_length"])
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      eval_dataset=dev if o["eval_during_training"] else None,
                      processing_class=tokenizer, data_collator=make_collator(tokenizer),
                      compute_metrics=None if squad else make_compute_metrics(t.name),
                      callbacks=[_ConsoleLogCallback()])
    train_out = trainer.train()
    train_seconds = time.perf_counter() - started
    if not run.writes:
        return _other_rank_result("finetune", trainer)
    metrics = _evaluate(t, model, tokenizer, dev, o, desc="eval dev", out=out)
    model_dir = out / "model"
    trainer.model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    plots = _save_history(trainer, out)
    result = run.update_metrics(command="finetune", task=t.name, eval=metrics, train_loss=train_out.training_loss,
                                train_steps=trainer.state.global_step, train_examples=len(train), data=data_desc,
                                train_seconds=train_seconds, wall_seconds=time.perf_counter() - started,
                                cpu_seconds=time.process_time(),
                                model_dir=str(model_dir), plots=plots)
    log.info("finetune done: %s %s = %.4f (dev, %d examples), model in %s, %.0f s", t.name, metrics["main_metric"],
             metrics[metrics["main_metric"]], metrics["num_examples"], model_dir, time.perf_counter() - started)
    return result


def finetune_from_args(options: Dict[str, Any]) -> Dict[str, Any]:
    return finetune(options)


# -- prune -------------------------------------------------------------------------------------------------------

def build_cap_config(o: Dict[str, Any], has_teacher: bool):
    """CAPConfig from the recipe, then the explicit flags, then ``--cap-option`` values."""
    from .cap.config import CAPConfig

    cfg = CAPConfig.recipe(o["recipe"])
    fields = {f.name for f in dataclasses.fields(cfg)}
    updates: Dict[str, Any] = {}
    if o.get("method") is not None:
        updates["method"] = o["method"]
    if o.get("cap") is not None:
        updates["use_cap"] = bool(o["cap"])
    if o.get("sparsity") is not None:
        updates["target_sparsity"] = float(o["sparsity"])
    if o.get("block_size") is not None:
        updates["block_size"] = int(o["block_size"])
    for key, value in (o.get("cap_options") or {}).items():
        if key not in fields:
            raise ValueError(f"--cap-option: unknown CAPConfig field {key!r}; known fields: "
                             f"{', '.join(sorted(fields))}")
        updates[key] = value
    unknown = [k for k in updates if k not in fields]
    if unknown:
        raise ValueError(f"CAPConfig has no field(s) {unknown}; known fields: {', '.join(sorted(fields))}")
    try:
        cfg = dataclasses.replace(cfg, **updates)
    except TypeError as exc:
        raise ValueError(f"--cap-option: {exc}") from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# Official GLUE run: w = 11000 steps of 113,710 (QQP, 10 epochs), i.e. about 0.1 of training.
SHORT_BUDGET_FRACTION = 0.1


def fit_schedule(cfg, total_steps: int, explicit: Dict[str, Any]):
    """Scale the cubic schedule to short budgets: when the recipe's unit in steps leaves no room to prune
    (``(i_w + f_w) * w >= total_steps``) and no schedule field was set explicitly, express ``w`` as
    the official fraction of training (0.1: dense warm-up 20%, pruning 50%, fixed masks 30% for GLUE)."""
    if getattr(cfg, "structured", False) or not hasattr(cfg, "schedule_unit"):
        return cfg
    if any(k in explicit for k in ("schedule_warmup", "schedule_unit", "initial_warmup", "final_warmup")):
        return cfg
    if cfg.schedule_unit == "steps" and (cfg.initial_warmup + cfg.final_warmup) * cfg.schedule_warmup >= total_steps:
        log.info("schedule: the recipe's %g-step unit does not fit %d steps; using %.2f of training as the unit "
                 "(same proportions as the official runs)", cfg.schedule_warmup, total_steps, SHORT_BUDGET_FRACTION)
        cfg = dataclasses.replace(cfg, schedule_unit="fraction", schedule_warmup=SHORT_BUDGET_FRACTION)
    return cfg


def _load_teacher(path, t):
    from .cap.trainer import is_qa_model
    from .export import load_any

    squad = is_squad_task(t)
    teacher, _ = load_any(path, question_answering=squad)
    if squad:
        _check_qa_checkpoint(teacher, path, "--teacher")
    elif is_qa_model(teacher):
        raise ValueError(f"--teacher: {path!r} is a question-answering model ({type(teacher).__name__}); "
                         f"expected a classifier for --task {t.name}")
    got = getattr(teacher.config, "num_labels", None)
    if not squad and got != t.num_labels:
        raise ValueError(f"--teacher: {path!r} has {got} labels, expected {t.num_labels} for the task")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _check_qa_checkpoint(model, path, flag: str) -> None:
    """A model that must already be a trained QA model (teacher, evaluated model): not a fresh QA head."""
    from .cap.trainer import is_qa_model
    from .export import is_compressed_dir

    if not is_qa_model(model):
        raise ValueError(f"{flag}: {path!r} is a {type(model).__name__}, expected a question-answering model "
                         f"(...ForQuestionAnswering) for --task squad")
    if is_compressed_dir(path):  # rebuilt from its own model class (capsparse.json), head included
        return
    archs = list(getattr(model.config, "architectures", None) or [])
    if archs and not any(a.endswith("ForQuestionAnswering") for a in archs):
        raise ValueError(f"{flag}: {path!r} has no trained question-answering head (architectures {archs}); "
                         f"fine-tune one first with `capsparse finetune --task squad`")


def check_squad_cap_config(cap_config) -> None:
    """SQuAD has no class labels and its models no pooler: refuse supervised positives / the pooler early."""
    if getattr(cap_config, "use_cap", False) and getattr(cap_config, "w_s", 0) > 0:
        raise ValueError(f"--task squad: w_s={cap_config.w_s} asks for supervised contrastive positives, which need "
                         f"class labels; use --recipe squad-unstructured / squad-structured (w_s=0) or "
                         f"--cap-option w_s=0")
    if getattr(cap_config, "use_cap", False) and getattr(cap_config, "representation", None) == "pooler":
        raise ValueError("--task squad: representation='pooler' needs a pooler, which QA models lack; use the "
                         "squad recipes (raw [CLS]) or --cap-option representation=cls")


def prune(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Fine-prune a model with CAPTrainer (CAP or a plain baseline); saves ``<output_dir>/compressed``."""
    from .cap.trainer import CAPTrainer
    from .export import export_compressed, is_compressed_dir

    o = _opts(options, **overrides)
    t = _task(o["task"])
    squad = is_squad_task(t)
    if o["model"] not in (None, "default") and is_compressed_dir(o["model"]):
        raise ValueError(f"--model: {o['model']!r} is a compressed export; prune starts from a dense transformers "
                         f"model directory")
    cap_config = build_cap_config(o, has_teacher=o["teacher"] is not None)
    if squad:
        check_squad_cap_config(cap_config)
    sources = _squad_sources(t, o)
    label = method_label(cap_config)
    out = Path(o["output_dir"] or _default_output_dir(f"prune-{label}", t.name))
    run = RunDir(out, command="prune")
    o["output_dir"] = str(out)
    run.write_config(o, cap_config=cap_config.to_dict())
    _seed(o["seed"])
    started = time.perf_counter()
    model, tokenizer = _load_model(t, o["model"])
    teacher = _load_teacher(o["teacher"], t) if o["teacher"] else None
    if teacher is None and (cap_config.w_kd > 0 or "fic" in cap_config.active_banks):
        log.warning("no --teacher: CAPTrainer first fine-tunes a dense copy for teacher_epochs=%g epochs (set "
                    "--teacher to reuse one, or --cap-option w_kd=0 with --no-cap for no teacher)",
                    cap_config.teacher_epochs)
    train, dev, data_desc = _load_train_dev(t, tokenizer, o, sources)
    lr = o["learning_rate"] or 3e-5
    if o.get("warmup_ratio") is None and not getattr(cap_config, "structured", False):
        o["warmup_ratio"] = SHORT_BUDGET_FRACTION  # the official LR warm-up is the schedule unit w
    args, total = training_arguments(o, out, lr, len(train), remove_unused=False,
                                     eval_strategy="steps" if o["eval_during_training"] else "no")
    cap_config = fit_schedule(cap_config, total, o.get("cap_options") or {})
    if run.writes:
        write_json(out / "cap_config.json", cap_config.to_dict())
    log.info("prune %s with %s (target sparsity %.3f): %s, %d steps, lr %g, batch %d, max_length %d, teacher %s",
             t.name, label, getattr(cap_config, "target_sparsity", float("nan")), data_desc, total, lr,
             o["batch_size"], o["max_length"], o["teacher"])
    trainer = CAPTrainer(model=model, args=args, cap_config=cap_config, train_dataset=train,
                         eval_dataset=dev if o["eval_during_training"] else None, teacher=teacher,
                         processing_class=tokenizer, data_collator=make_collator(tokenizer),
                         compute_metrics=None if squad else make_compute_metrics(t.name),
                         callbacks=[_ConsoleLogCallback()])
    train_out = trainer.train()
    train_seconds = time.perf_counter() - started
    if not run.writes:
        return _other_rank_result("prune", trainer)
    model = trainer.model
    report = trainer.sparsity_report()
    compacted = None
    if getattr(cap_config, "structured", False):
        compacted = trainer.compact()
    trainer.finalize()  # drop score parameters and hooks: plain SparseLinear layers with their masks remain
    metrics = _evaluate(t, model, tokenizer, dev, o, desc="eval dev", out=out)
    export_dir = out / "compressed"
    meta = export_compressed(model, export_dir, tokenizer=tokenizer,
                             extra_metadata={"task": t.name, "method": label, "cap_config": cap_config.to_dict(),
                                             "eval": metrics})
    plots = _save_history(trainer, out, target_sparsity=getattr(cap_config, "target_sparsity", None))
    result = run.update_metrics(
        command="prune", task=t.name, method=label, use_cap=bool(getattr(cap_config, "use_cap", False)),
        target_sparsity=getattr(cap_config, "target_sparsity", None), sparsity=report.get("global"),
        sparsity_report=report, eval=metrics, train_loss=train_out.training_loss, train_steps=trainer.state.global_step,
        train_examples=len(train), data=data_desc, train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time(),
        export_dir=str(export_dir), export_bytes=meta["file_bytes"], dense_bytes=meta["dense_bytes"], plots=plots,
        teacher=o["teacher"], compacted=compacted)
    log.info("prune done: %s at sparsity %.4f: %s %s = %.4f; export %s (%.1f MB, dense %.1f MB); %.0f s", label,
             report.get("global", float("nan")), t.name, metrics["main_metric"], metrics[metrics["main_metric"]],
             export_dir, meta["file_bytes"] / 1e6, meta["dense_bytes"] / 1e6, time.perf_counter() - started)
    return result


def method_label(cap_config) -> str:
    """``CAP-m``, ``movement``, ``CAP-soft``, ``CAP-block``, ``CAP-f``... from a CAPConfig."""
    method = getattr(cap_config, "method", "movement")
    cap = bool(getattr(cap_config, "use_cap", False))
    if not cap:
        return method
    return {"movement": "CAP-m", "soft-movement": "CAP-soft", "block-movement": "CAP-block",
            "first-order": "CAP-f", "magnitude": "CAP-magnitude"}.get(method, f"CAP-{method}")


def prune_from_args(options: Dict[str, Any]) -> Dict[str, Any]:
    return prune(options)


# -- evaluate / export / predict -------------------------------------------------------------------------------------

def evaluate(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Evaluate a transformers directory or a compressed export on a GLUE split (or SQuAD: exact match / F1)."""
    from .cap.trainer import is_qa_model
    from .export import encoder_sparsity, load_any

    o = _opts(options, **overrides)
    t = _task(o["task"])
    squad = is_squad_task(t)
    if squad:
        _check_squad_options(o)
    source = squad_source(o, o["split"]) if squad else None  # before loading anything
    model, tokenizer = load_any(o["model"], question_answering=squad)
    if squad:
        _check_qa_checkpoint(model, o["model"], "--model")
    elif is_qa_model(model):
        raise ValueError(f"--model: {o['model']!r} is a question-answering model ({type(model).__name__}); "
                         f"evaluate it with --task squad")
    elif getattr(model.config, "num_labels", t.num_labels) != t.num_labels:
        raise ValueError(f"--model: {o['model']!r} has {model.config.num_labels} labels, expected {t.num_labels} "
                         f"for --task {t.name}")
    run = RunDir(o["output_dir"], command="eval") if o["output_dir"] else None
    if run:
        run.write_config(o)
    if squad:
        data = load_squad_split(tokenizer, o, o["split"], source, o["max_eval_examples"])
    else:
        data = load_split(t.name, tokenizer, o["split"], o["glue_dir"], o["max_length"], o["max_eval_examples"],
                          o["seed"])
    metrics = _evaluate(t, model, tokenizer, data, o, desc=f"eval {o['split']}",
                        out=Path(o["output_dir"]) if run else None)
    sp = encoder_sparsity(model)
    metrics["sparsity"] = sp["global"] if sp["total"] else 0.0
    line = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "eval_seconds")
    print(f"{t.name} {o['split']} ({metrics['num_examples']} examples): {line}")
    if run:
        run.update_metrics(command="eval", task=t.name, split=o["split"], model=o["model"], eval=metrics)
    return metrics


def evaluate_from_args(options: Dict[str, Any]) -> Dict[str, Any]:
    return evaluate(options)


def export(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Re-export a compressed export, or export a transformers directory whose pruned weights are zeros."""
    import torch

    from .export import export_compressed, is_compressed_dir, load_compressed
    from .surgery import sparse_layers, sparsify

    o = _opts(options, **overrides)
    src = o["model"]
    out = Path(o["output_dir"] or _default_output_dir("export", None))
    if is_compressed_dir(src):
        model, tokenizer = load_compressed(src, return_tokenizer=True)
    else:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        arch = (transformers.AutoConfig.from_pretrained(src).architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None  # e.g. BertForQuestionAnswering keeps its head
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = transformers.AutoModelForSequenceClassification
        model = cls.from_pretrained(src)
        sparsify(model, block_size=o.get("block_size"))
        with torch.no_grad():
            for _, mod in sparse_layers(model):
                nz = mod.weight != 0
                if mod.block_size is None:
                    mod.set_mask(nz)
                else:
                    bm, bk = mod.block_size
                    n, k = nz.shape
                    mod.set_mask(nz.reshape(n // bm, bm, k // bk, bk).any(3).any(1))
    meta = export_compressed(model, out, tokenizer=tokenizer, values_dtype=torch.float16 if o.get("fp16") else None,
                             extra_metadata={"source": str(src)})
    print(f"exported {src} -> {out}: sparsity {meta['sparsity']:.4f}, {meta['file_bytes'] / 1e6:.2f} MB "
          f"(dense fp32 {meta['dense_bytes'] / 1e6:.2f} MB)")
    return meta


def export_from_args(options: Dict[str, Any]) -> Dict[str, Any]:
    return export(options)


def predict(options: Optional[Dict[str, Any]] = None, **overrides) -> List[Dict[str, Any]]:
    import sys

    import torch

    from .export import load_any

    from .cap.trainer import is_qa_model

    o = _opts(options, **overrides)
    model, tokenizer = load_any(o["model"])
    if is_qa_model(model):
        raise ValueError(f"--model: {o['model']!r} is a question-answering model; predict classifies sentences "
                         f"(evaluate QA models with `capsparse eval --task squad`)")
    texts = list(o.get("text") or [])
    if o.get("input"):
        stream = sys.stdin if o["input"] == "-" else open(o["input"], encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream if line.strip()]
    id2label = dict(getattr(model.config, "id2label", {}) or {})
    if o.get("task"):
        t = _task(o["task"])
        if t.label_names:
            id2label = dict(t.id2label)
    results = []
    with torch.inference_mode():
        for i in range(0, len(texts), o["batch_size"]):
            chunk = texts[i:i + o["batch_size"]]
            pairs = [s.split(" ||| ", 1) for s in chunk]
            if all(len(p) == 2 for p in pairs):
                enc = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True,
                                max_length=o["max_length"], padding=True, return_tensors="pt")
            else:
                enc = tokenizer(chunk, truncation=True, max_length=o["max_length"], padding=True, return_tensors="pt")
            logits = model(**enc).logits.float()
            if logits.shape[-1] == 1:
                for s, v in zip(chunk, logits[:, 0].tolist()):
                    results.append({"text": s, "score": v})
                continue
            probs = logits.softmax(-1)
            for s, p in zip(chunk, probs):
                k = int(p.argmax())
                label = id2label.get(k, id2label.get(str(k), str(k)))
                results.append({"text": s, "label": label, "label_id": k,
                                "probabilities": [round(float(x), 4) for x in p]})
    for r in results:
        if o.get("json"):
            print(json.dumps(r))
        elif "score" in r:
            print(f"{r['score']:.4f}\t{r['text']}")
        else:
            print(f"{r['label']}\t{max(r['probabilities']):.3f}\t{r['text']}")
    return results


def predict_from_args(options: Dict[str, Any]) -> List[Dict[str, Any]]:
    return predict(options)


# -- demo ----------------------------------------------------------------------------------------------------------

FULL_RECIPE_HINT = """\
Full-size recipe (BERT-base, GPU; the paper's settings, cap-method.md section 4):
  capsparse finetune --model bert-base-uncased --task mnli --epochs 3 --max-length 128 --output-dir runs/mnli-teacher
  capsparse prune --model bert-base-uncased --teacher runs/mnli-teacher/model --task mnli --recipe glue-unstructured \\
      --method movement --cap --sparsity 0.97 --epochs 10 --batch-size 32 --max-length 128 \\
      --output-dir runs/mnli-capm-97
(needs the MNLI files in --glue-dir; paper target: CAP at 97% keeps 96.3% of BERT-base on MNLI, about 80-81 m-acc)"""


def _fmt_mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n is not None else "-"


def demo(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Teacher -> CAP-m and movement at the same budget -> eval, export, table. See ``capsparse demo --help``."""
    o = _opts(options, **overrides)
    quick = bool(o.get("quick"))
    out = Path(o["output_dir"] or "runs/demo")
    run = RunDir(out, command="demo", sticky=True)
    n_train = o.get("train_examples") or (256 if quick else 4000)
    teacher_steps = o.get("teacher_steps") or (8 if quick else 300)
    prune_steps = o.get("prune_steps") or (12 if quick else 300)
    n_eval = o.get("max_eval_examples") or (128 if quick else None)
    lr = o.get("learning_rate") or 1e-4
    o.update(output_dir=str(out), train_examples=n_train, teacher_steps=teacher_steps, prune_steps=prune_steps)
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
    from .export import export_compressed, load_any

    tmodel, ttok = load_any(teacher["model_dir"])
    tmeta = export_compressed(tmodel, out / "teacher" / "compressed", tokenizer=ttok)
    rows[0]["bytes"] = tmeta["file_bytes"]
    results = {"teacher": teacher}
    for label, cap in (("CAP-m", True), ("movement", False)):
        run_dir = out / ("cap-m" if cap else "movement")
        t0 = time.perf_counter()
        student = teacher["model_dir"] if o.get("student_init", "teacher") == "teacher" else o["model"]
        res = prune(dict(common, model=student), output_dir=str(run_dir), teacher=teacher["model_dir"],
                    method="movement", cap=cap,
                    sparsity=o["sparsity"], max_steps=prune_steps, learning_rate=lr, recipe="glue-unstructured",
                    cap_options=o.get("cap_options"))
        rows.append(dict(method=label, sparsity=res["sparsity"], accuracy=res["eval"]["accuracy"],
                         bytes=res["export_bytes"], wall=time.perf_counter() - t0))
        results[label] = res
    total = time.perf_counter() - started
    lines = ["| method | sparsity | SST-2 dev acc | file size | wall time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['sparsity']:.1f}% | {100 * r['accuracy']:.2f} | "
                     f"{_fmt_mb(r['bytes'])} "
                     f"| {r['wall']:.0f} s |")
    table = "\n".join(lines)
    (out / "demo_table.md").write_text(table + "\n")
    run.update_metrics(command="demo", rows=rows, wall_seconds=total, cpu_seconds=time.process_time(), quick=quick,
                       machine=machine_info(),
                       budget=dict(train_examples=n_train, teacher_steps=teacher_steps, prune_steps=prune_steps,
                                   max_length=o["max_length"], batch_size=o["batch_size"], eval_examples=n_eval))
    print()
    print(table)
    print(f"\ndemo wall time: {total / 60:.1f} min (CPU time {time.process_time() / 60:.1f} min); runs in {out}/ "
          f"(config.json, metrics.json, run.log, PNG plots, "
          f"compressed exports)")
    if quick:
        print("(--quick: a smoke run, the numbers are not meaningful)")
    majority = _majority_share(ttok, o, n_eval)
    if majority is not None and any(abs(r["accuracy"] - majority) < 0.01 for r in rows[1:]):
        print(f"\nA pruned model scores within 1 point of the majority-class share of these dev examples "
              f"({100 * majority:.2f}%): it predicts one class. Movement scores need thousands of steps before "
              f"they rank weights well; in a short run the first pruning steps remove salient weights and the "
              f"student collapses (docs/results.md, 'Why short movement runs collapse').")
    print("\n" + FULL_RECIPE_HINT)
    return {"rows": rows, "wall_seconds": total, "results": results}


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


def demo_from_args(options: Dict[str, Any]) -> Dict[str, Any]:
    return demo(options)
