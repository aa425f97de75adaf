"""The commands: finetune, prune, evaluate, export, predict.

Each takes a plain options dict (the CLI's parsed flags, or a dict from Python) plus keyword overrides, writes a run
directory (``config.json``, ``metrics.json``, ``run.log``, PNG plots, model files) and returns its metrics dict, e.g.
``prune({"task": "sst2", "method": "movement", "cap": True, "sparsity": 0.9, "teacher": "runs/teacher/model",
"output_dir": "runs/capm"})``.

``task="squad"`` (SQuAD v1.1) runs ``finetune`` / ``prune`` / ``evaluate`` on a ``...ForQuestionAnswering`` model:
training features are question/context windows (``max_length``, ``doc_stride``, ``max_query_length``), one CAP bank
row per feature; evaluation post-processes start/end logits into answers and reports the official ``exact_match``
and ``f1`` (0-100). The data comes from ``squad_train_file`` / ``squad_dev_file``, else ``squad_dir`` /
``$CAPSPARSE_SQUAD_DIR`` / ``../shared/squad`` (``train-v1.1.json``, ``dev-v1.1.json``), else the hub when
reachable; otherwise a FileNotFoundError names where it looked, before any model is loaded.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data.squad import is_squad_task
from ..runlog import RunDir, get_logger, write_json
from . import tasks
from .options import OptionError, build_cap_config, default_output_dir, fit_schedule, method_label, resolve
from .run import (clear_if_overwrite, finish_run, open_run, other_rank_result, plan_run, run_callbacks,
                  seed_everything, train, training_arguments, untimed)
from .tasks import get_task, load_squad_split, make_collator, make_compute_metrics, squad_source

log = get_logger("app")


def finetune(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Fine-tune a dense model (a KD teacher, or the dense reference). Saves ``<output_dir>/model``."""
    from transformers import Trainer

    o = resolve(options, "finetune", **overrides)
    t = get_task(o["task"])
    plan_run(o, "finetune", t.name)
    raw = tasks.load_raw(t, o)  # missing or bad data fails before any model is loaded
    started = time.perf_counter()
    seed_everything(o["seed"])
    model, tokenizer = tasks.load_model(t, o["model"])
    run = open_run(o, "finetune")  # only now: a model that cannot be loaded leaves no run directory
    train_set, dev, data_desc = tasks.featurize(t, tokenizer, o, raw)
    args, total = training_arguments(o, run.path, len(train_set))
    log.info("finetune %s: %s, %d steps, lr %g, batch %d, max_length %d", t.name, data_desc, total,
             o["learning_rate"], o["batch_size"], o["max_length"])
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      eval_dataset=dev if o["eval_during_training"] else None,
                      processing_class=tokenizer, data_collator=make_collator(tokenizer),
                      compute_metrics=None if is_squad_task(t) else make_compute_metrics(t.name),
                      callbacks=run_callbacks(checkpoints=bool(o["save_steps"])))
    train_out = train(trainer, o, run)
    train_seconds = time.perf_counter() - started
    if not run.writes:
        return other_rank_result("finetune", trainer)
    metrics = tasks.evaluate_task(t, model, tokenizer, dev, o, desc="eval dev", out=run.path)
    model_dir = run.path / "model"
    trainer.model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    result = finish_run(run, trainer, train_out, started, command="finetune", task=t.name, eval=metrics,
                        train_examples=len(train_set), data=data_desc, train_seconds=train_seconds,
                        model_dir=str(model_dir))
    log.info("finetune done: %s %s = %.4f (dev, %d examples), model in %s, %.0f s", t.name, metrics["main_metric"],
             metrics[metrics["main_metric"]], metrics["num_examples"], model_dir, time.perf_counter() - started)
    return result


def prune(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Fine-prune a model with CAPTrainer (CAP or a plain baseline); saves ``<output_dir>/compressed``."""
    from ..cap.trainer import CAPTrainer
    from ..export import export_compressed, is_compressed_dir

    o = resolve(options, "prune", **overrides)
    t = get_task(o["task"])
    if o["model"] not in (None, "default") and is_compressed_dir(o["model"]):
        raise OptionError(f"--model: {o['model']!r} is a compressed export; prune starts from a dense transformers "
                          f"model directory")
    cap_config = build_cap_config(o)
    tasks.check_labels_before_loading("--model", o["model"], t)
    if o["teacher"]:
        tasks.check_labels_before_loading("--teacher", o["teacher"], t)
    if o["prc_model"] and "prc" not in cap_config.active_banks:
        raise OptionError(f"--prc-model: got {o['prc_model']!r}, but the PrC bank is off (--no-cap or banks="
                          f"{list(cap_config.banks)}); expected no --prc-model, or CAP with the 'prc' bank")
    label = method_label(cap_config)
    plan_run(o, "prune", t.name, label=label)
    raw = tasks.load_raw(t, o)  # missing or bad data fails before any model is loaded
    started = time.perf_counter()
    seed_everything(o["seed"])
    model, tokenizer = tasks.load_model(t, o["model"])
    teacher = tasks.load_teacher(o["teacher"], t) if o["teacher"] else None
    prc_model = tasks.load_model(t, o["prc_model"], flag="--prc-model")[0] if o["prc_model"] else None
    run = open_run(o, "prune", cap_config=cap_config.to_dict())  # only now: bad models leave no run directory
    if teacher is None and cap_config.needs_teacher:
        log.warning("no --teacher: CAPTrainer first fine-tunes a dense copy for teacher_epochs=%g epochs (set "
                    "--teacher to reuse one, or --cap-option w_kd=0 with --no-cap and w_hidden=0 for no teacher)",
                    cap_config.teacher_epochs)
    train_set, dev, data_desc = tasks.featurize(t, tokenizer, o, raw)
    args, total = training_arguments(o, run.path, len(train_set), remove_unused=False)
    cap_config = fit_schedule(cap_config, total, o["cap_options"])
    if run.writes:
        write_json(run.path / "cap_config.json", cap_config.to_dict())
    target = "set by its L1 penalty" if o["sparsity"] is None else f"target sparsity {o['sparsity']:.3f}"
    log.info("prune %s with %s (%s): %s, %d steps, lr %g, batch %d, weight decay %g, max_length %d, teacher %s",
             t.name, label, target, data_desc, total, o["learning_rate"], o["batch_size"], o["weight_decay"],
             o["max_length"], o["teacher"])
    trainer = CAPTrainer(model=model, args=args, cap_config=cap_config, train_dataset=train_set,
                         eval_dataset=dev if o["eval_during_training"] else None, teacher=teacher,
                         prc_model=prc_model,
                         processing_class=tokenizer, data_collator=make_collator(tokenizer),
                         compute_metrics=None if is_squad_task(t) else make_compute_metrics(t.name),
                         callbacks=run_callbacks(checkpoints=False))  # CAPTrainer adds the manifest writer itself
    train_out = train(trainer, o, run)
    train_seconds = time.perf_counter() - started
    if not run.writes:
        return other_rank_result("prune", trainer)
    model = trainer.model
    report = trainer.sparsity_report()
    compacted = trainer.compact() if cap_config.structured else None
    trainer.finalize()  # drop score parameters and hooks: plain SparseLinear layers with their masks remain
    metrics = tasks.evaluate_task(t, model, tokenizer, dev, o, desc="eval dev", out=run.path)
    export_dir = run.path / "compressed"
    meta = export_compressed(model, export_dir, tokenizer=tokenizer,
                             extra_metadata={"task": t.name, "method": label, "cap_config": cap_config.to_dict(),
                                             "eval": untimed(metrics)})
    result = finish_run(
        run, trainer, train_out, started, plot_target=o["sparsity"],
        command="prune", task=t.name, method=label, use_cap=cap_config.use_cap, target_sparsity=o["sparsity"],
        sparsity=report.get("global"), sparsity_report=report, eval=metrics, train_examples=len(train_set),
        data=data_desc, train_seconds=train_seconds, export_dir=str(export_dir), export_bytes=meta["file_bytes"],
        dense_bytes=meta["dense_bytes"], teacher=o["teacher"], compacted=compacted)
    log.info("prune done: %s at sparsity %.4f: %s %s = %.4f; export %s (%.1f MB, dense %.1f MB); %.0f s", label,
             report.get("global", float("nan")), t.name, metrics["main_metric"], metrics[metrics["main_metric"]],
             export_dir, meta["file_bytes"] / 1e6, meta["dense_bytes"] / 1e6, time.perf_counter() - started)
    return result


def _output_run(o: Dict[str, Any], command: str) -> Optional[RunDir]:
    """The ``--output-dir`` of a command that does not train (``None`` without one); replaced with --overwrite."""
    if not o.get("output_dir"):
        return None
    out = Path(o["output_dir"])
    clear_if_overwrite(out, o)
    run = RunDir(out, command=command)
    run.write_config(o)
    return run


def evaluate(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Evaluate a transformers directory or a compressed export on a GLUE split (or SQuAD: exact match / F1)."""
    from ..cap.heads import is_qa_model
    from ..export import load_any
    from ..sparsity import sparsity_report

    o = resolve(options, "eval", **overrides)
    t = get_task(o["task"])
    squad = is_squad_task(t)
    tasks.check_labels_before_loading("--model", o["model"], t)
    if squad:  # located before anything is loaded
        source = squad_source(o, o["split"])
    else:
        from ..data import load_glue

        raw = load_glue(t.name, o["split"], glue_dir=o["glue_dir"], max_examples=o["max_eval_examples"],
                        seed=o["seed"])
        if len(raw) and all(label == -1 for label in raw["label"]):
            raise OptionError(f"--split: {o['split']!r} of {t.name} has no labels (all -1), so there is nothing to "
                              f"score; use `capsparse predict` to label it")
    model, tokenizer = tasks.load_checked("--model", o["model"], load_any, o["model"], question_answering=squad)
    if squad:
        tasks.check_qa_checkpoint(model, o["model"], "--model")
    elif is_qa_model(model):
        raise OptionError(f"--model: {o['model']!r} is a question-answering model ({type(model).__name__}); "
                          f"evaluate it with --task squad")
    elif getattr(model.config, "num_labels", t.num_labels) != t.num_labels:
        raise OptionError(f"--model: {o['model']!r} has {model.config.num_labels} labels, expected {t.num_labels} "
                          f"for --task {t.name}")
    run = _output_run(o, "eval")
    if squad:
        data = load_squad_split(tokenizer, o, o["split"], source, o["max_eval_examples"])
    else:
        from ..data import tokenize_dataset

        data = tokenize_dataset(raw, tokenizer, t.name, max_length=o["max_length"])
    metrics = tasks.evaluate_task(t, model, tokenizer, data, o, desc=f"eval {o['split']}",
                                  out=run.path if run else None)
    metrics["sparsity"] = sparsity_report(model).sparsity
    line = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "eval_seconds")
    print(f"{t.name} {o['split']} ({metrics['num_examples']} examples): {line}")
    if run:
        run.update_metrics(command="eval", task=t.name, split=o["split"], model=o["model"], eval=metrics)
    return metrics


def export(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Re-export a compressed export, or export a transformers directory whose pruned weights are zeros."""
    import torch

    from ..export import export_compressed, is_compressed_dir, load_compressed
    from ..surgery import sparse_layers, sparsify

    o = resolve(options, "export", **overrides)
    src = o["model"]
    out = Path(o["output_dir"] or default_output_dir("export", None))
    if is_compressed_dir(src):
        model, tokenizer = tasks.load_checked("--model", src, load_compressed, src, return_tokenizer=True)
    else:
        model, tokenizer = tasks.load_checked("--model", src, _load_dense, src)
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
    clear_if_overwrite(out, o)
    meta = export_compressed(model, out, tokenizer=tokenizer, values_dtype=torch.float16 if o.get("fp16") else None,
                             extra_metadata={"source": str(src)})
    print(f"exported {src} -> {out}: sparsity {meta['sparsity']:.4f}, {meta['file_bytes'] / 1e6:.2f} MB "
          f"(dense fp32 {meta['dense_bytes'] / 1e6:.2f} MB)")
    return meta


def _load_dense(src):
    """A transformers directory with its own head class (e.g. BertForQuestionAnswering), and its tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    arch = (transformers.AutoConfig.from_pretrained(src).architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForSequenceClassification
    return cls.from_pretrained(src), tokenizer


def predict(options: Optional[Dict[str, Any]] = None, **overrides) -> List[Dict[str, Any]]:
    """Label each ``text`` (and each line of ``input``); with ``output_dir`` also write ``predictions.jsonl``."""
    import sys

    import torch

    from ..cap.heads import is_qa_model
    from ..export import load_any

    given = dict(options or {}, **overrides)
    o = resolve(given, "predict", task=given.get("task"))  # no task: the model config's labels
    model, tokenizer = tasks.load_checked("--model", o["model"], load_any, o["model"])
    if is_qa_model(model):
        raise OptionError(f"--model: {o['model']!r} is a question-answering model; predict classifies sentences "
                         f"(evaluate QA models with `capsparse eval --task squad`)")
    texts = list(o.get("text") or [])
    if o.get("input"):
        stream = sys.stdin if o["input"] == "-" else open(o["input"], encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream if line.strip()]
    id2label = dict(getattr(model.config, "id2label", {}) or {})
    if o.get("task"):
        t = get_task(o["task"])
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
    run = _output_run(o, "predict")
    if run:
        with open(run.path / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        run.update_metrics(command="predict", model=o["model"], num_inputs=len(results),
                           predictions=str(run.path / "predictions.jsonl"))
    for r in results:
        if o.get("json"):
            print(json.dumps(r))
        elif "score" in r:
            print(f"{r['score']:.4f}\t{r['text']}")
        else:
            print(f"{r['label']}\t{max(r['probabilities']):.3f}\t{r['text']}")
    return results
