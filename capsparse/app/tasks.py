"""GLUE and SQuAD as tasks: loading data, models and teachers, metrics and evaluation loops."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..data.squad import is_squad_task
from ..runlog import get_logger, write_json
from .options import OptionError

log = get_logger("app")


@dataclasses.dataclass(frozen=True)
class SquadTask:
    """SQuAD v1.1 as a task (the GLUE flows use :class:`capsparse.data.GlueTask`)."""

    name: str = "squad"
    num_labels: int = 2  # start / end logits per token (the QA head's width)
    label_names: tuple = ()
    is_regression: bool = False
    main_metric: str = "f1"


def get_task(task):
    if is_squad_task(task):
        return SquadTask()
    from ..data import get_glue_task

    return get_glue_task(task)


# -- SQuAD data ----------------------------------------------------------------------------------------------

def squad_split(split: str) -> str:
    """``"train"`` or ``"validation"`` (aliases dev / val / valid / eval); ValueError otherwise."""
    from ..data.squad import _SPLIT_ALIASES, SQUAD_FILES

    name = _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    if name not in SQUAD_FILES:
        raise OptionError(f"unknown SQuAD split {split!r}; expected one of train, validation (dev)")
    return name


def squad_source(o: Dict[str, Any], split: str) -> Optional[Path]:
    """The SQuAD-format JSON for ``split``: ``squad_train_file`` / ``squad_dev_file``, else the first of
    ``squad_dir`` > ``$CAPSPARSE_SQUAD_DIR`` > ``../shared/squad`` holding ``train-v1.1.json`` / ``dev-v1.1.json``;
    ``None`` means the hub (reachable). Raises FileNotFoundError naming where it looked when there is neither."""
    from ..data.glue import hub_offline
    from ..data.squad import missing_squad_error, resolve_squad_file

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
    from ..data.squad import load_squad, squad_eval_features, squad_train_features

    examples = load_squad(squad_split(split), path=source, squad_dir=o.get("squad_dir"), max_examples=max_examples,
                          seed=o["seed"])
    kwargs = dict(max_length=o["max_length"], doc_stride=o["doc_stride"], max_query_length=o["max_query_length"])
    features = (squad_train_features if train else squad_eval_features)(examples, tokenizer, **kwargs)
    return examples, features


def load_split(task, tokenizer, split: str, glue_dir=None, max_length: int = 128, max_examples=None, seed: int = 0,
               cache_dir=None):
    """Tokenised GLUE split (no padding; a collator pads each batch dynamically)."""
    from ..data import load_glue, tokenize_dataset

    raw = load_glue(task, split, glue_dir=glue_dir, max_examples=max_examples, seed=seed)
    return tokenize_dataset(raw, tokenizer, task, max_length=max_length, cache_dir=cache_dir)


def make_collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)


def make_compute_metrics(task):
    from ..data.metrics import compute_glue_metrics

    def compute(eval_pred):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        return compute_glue_metrics(get_task(task).name, preds, labels)

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

    from ..data.metrics import compute_glue_metrics, main_metric

    t = get_task(task)
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
    from ..data.squad import postprocess_predictions, squad_metrics

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


def evaluate_task(t, model, tokenizer, dev, o: Dict[str, Any], desc: str, out: Optional[Path] = None):
    """GLUE metrics on a tokenised dataset, or SQuAD EM/F1 on ``(examples, features)``."""
    if is_squad_task(t):
        examples, features = dev
        return evaluate_squad(model, tokenizer, examples, features, o["eval_batch_size"], desc=desc,
                              predictions_path=None if out is None else out / "predictions.json")
    return evaluate_model(model, tokenizer, dev, t.name, o["eval_batch_size"], desc=desc)


def load_checked(flag: str, path, load, *args, **kwargs):
    """``load(*args, **kwargs)``; any failure to read a model (truncated or swapped weight files, a directory from
    another tool, a refused pickle, a layout mismatch) becomes one OptionError line naming ``flag`` and ``path``."""
    try:
        return load(*args, **kwargs)
    except OptionError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader error is a bad input here
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        detail = " ".join(lines[0].split())[:300] if lines else ""
        raise OptionError(f"{flag}: cannot load {str(path)!r}: {type(exc).__name__}"
                          f"{': ' + detail if detail else ''}") from None


def check_labels_before_loading(flag: str, path, t) -> None:
    """A fine-tuned classifier directory whose label count does not fit the task is refused from its
    ``config.json`` alone (no weights read)."""
    if path in (None, "default") or not (Path(path) / "config.json").is_file():
        return
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OptionError(f"{flag}: cannot read {Path(path) / 'config.json'} ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise OptionError(f"{flag}: {Path(path) / 'config.json'} is not a JSON object")
    archs = [str(a) for a in config.get("architectures") or []]
    if not is_squad_task(t) and any(a.endswith("ForQuestionAnswering") for a in archs):
        raise OptionError(f"{flag}: {str(path)!r} is a question-answering model ({archs[0]}); expected a classifier "
                          f"for --task {t.name} (question answering is --task squad)")
    # transformers leaves the default of 2 labels out of config.json
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if (not is_squad_task(t) and any(a.endswith("ForSequenceClassification") for a in archs)
            and labels != t.num_labels):
        raise OptionError(f"{flag}: {str(path)!r} is a classifier with {labels} labels, expected {t.num_labels} "
                          f"for --task {t.name}")


def load_model(t, model: str, flag: str = "--model"):
    """The student / dense model and its tokenizer: a QA model for SQuAD, a classifier for GLUE."""
    from ..models import load_default

    check_labels_before_loading(flag, model, t)
    if is_squad_task(t):
        return load_checked(flag, model, load_default, model=model, question_answering=True)
    net, tokenizer = load_checked(flag, model, load_default, t.num_labels, model=model)
    if t.label_names:
        net.config.id2label = dict(t.id2label)
        net.config.label2id = dict(t.label2id)
    return net, tokenizer


def load_raw(t, o: Dict[str, Any]):
    """The training and dev data before tokenisation, read first so that missing or bad data fails before any
    model is loaded: GLUE datasets, or SQuAD ``(source, examples)`` per split."""
    if is_squad_task(t):
        from ..data.squad import load_squad

        raw = {}
        for split, limit in (("train", o["max_train_examples"]), ("validation", o["max_eval_examples"])):
            source = squad_source(o, split)
            raw[split] = load_squad(split, path=source, squad_dir=o.get("squad_dir"), max_examples=limit,
                                    seed=o["seed"])
        return raw
    from ..data import load_glue

    return {split: load_glue(t.name, split, glue_dir=o["glue_dir"], max_examples=limit, seed=o["seed"])
            for split, limit in (("train", o["max_train_examples"]), ("validation", o["max_eval_examples"]))}


def featurize(t, tokenizer, o: Dict[str, Any], raw):
    """``(train, dev, description)`` from :func:`load_raw`: SQuAD gives training features and
    ``(dev examples, dev features)``."""
    if is_squad_task(t):
        from ..data.squad import squad_eval_features, squad_train_features

        kwargs = dict(max_length=o["max_length"], doc_stride=o["doc_stride"], max_query_length=o["max_query_length"])
        train_ex, dev_ex = raw["train"], raw["validation"]
        train = squad_train_features(train_ex, tokenizer, **kwargs)
        dev_feats = squad_eval_features(dev_ex, tokenizer, **kwargs)
        desc = (f"{len(train)} train features ({len(train_ex)} questions) / {len(dev_feats)} dev features "
                f"({len(dev_ex)} questions), doc_stride {o['doc_stride']}")
        return train, (dev_ex, dev_feats), desc
    from ..data import tokenize_dataset

    train, dev = (tokenize_dataset(raw[s], tokenizer, t.name, max_length=o["max_length"])
                  for s in ("train", "validation"))
    return train, dev, f"{len(train)} train / {len(dev)} dev examples"


def load_teacher(path, t):
    from ..cap.heads import is_qa_model
    from ..export import load_any

    squad = is_squad_task(t)
    check_labels_before_loading("--teacher", path, t)
    teacher, _ = load_checked("--teacher", path, load_any, path, question_answering=squad)
    if squad:
        check_qa_checkpoint(teacher, path, "--teacher")
    elif is_qa_model(teacher):
        raise OptionError(f"--teacher: {path!r} is a question-answering model ({type(teacher).__name__}); "
                         f"expected a classifier for --task {t.name}")
    got = getattr(teacher.config, "num_labels", None)
    if not squad and got != t.num_labels:
        raise OptionError(f"--teacher: {path!r} has {got} labels, expected {t.num_labels} for the task")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def check_qa_checkpoint(model, path, flag: str) -> None:
    """A model that must already be a trained QA model (teacher, evaluated model): not a fresh QA head."""
    from ..cap.heads import is_qa_model
    from ..export import is_compressed_dir

    if not is_qa_model(model):
        raise OptionError(f"{flag}: {path!r} is a {type(model).__name__}, expected a question-answering model "
                         f"(...ForQuestionAnswering) for --task squad")
    if is_compressed_dir(path):  # rebuilt from its own model class (capsparse.json), head included
        return
    archs = list(getattr(model.config, "architectures", None) or [])
    if archs and not any(a.endswith("ForQuestionAnswering") for a in archs):
        raise OptionError(f"{flag}: {path!r} has no trained question-answering head (architectures {archs}); "
                         f"fine-tune one first with `capsparse finetune --task squad`")
