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
from .options import (SHORT_BUDGET_FRACTION, build_cap_config, check_squad_cap_config, check_squad_options,
                      default_output_dir, fit_schedule, method_label, resolve)
from .run import ConsoleLogCallback, other_rank_result, save_history, seed_everything, training_arguments
from .tasks import get_task, load_squad_split, load_split, make_collator, make_compute_metrics, squad_source

log = get_logger("app")


def finetune(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Fine-tune a dense model (a KD teacher, or the dense reference). Saves ``<output_dir>/model``."""
    from transformers import Trainer

    o = resolve(options, **overrides)
    t = get_task(o["task"])
    squad = is_squad_task(t)
    sources = tasks.squad_sources(t, o)
    out = Path(o["output_dir"] or default_output_dir("finetune", t.name))
    run = RunDir(out, command="finetune")
    o["output_dir"] = str(out)
    run.write_config(o)
    seed_everything(o["seed"])
    started = time.perf_counter()
    model, tokenizer = tasks.load_model(t, o["model"])
    train, dev, data_desc = tasks.load_train_dev(t, tokenizer, o, sources)
    lr = o["learning_rate"] or 5e-5
    args, total = training_arguments(o, out, lr, len(train),
                                     eval_strategy="steps" if o["eval_during_training"] else "no")
    log.info("finetune %s: %s, %d steps, lr %g, batch %d, max_length %d", t.name, data_desc, total, lr,
             o["batch_size"], o["max_length"])
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      eval_dataset=dev if o["eval_during_training"] else None,
                      processing_class=tokenizer, data_collator=make_collator(tokenizer),
                      compute_metrics=None if squad else make_compute_metrics(t.name),
                      callbacks=[ConsoleLogCallback()])
    train_out = trainer.train()
    train_seconds = time.perf_counter() - started
    if not run.writes:
        return other_rank_result("finetune", trainer)
    metrics = tasks.evaluate_task(t, model, tokenizer, dev, o, desc="eval dev", out=out)
    model_dir = out / "model"
    trainer.model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    plots = save_history(trainer, out)
    result = run.update_metrics(command="finetune", task=t.name, eval=metrics, train_loss=train_out.training_loss,
                                train_steps=trainer.state.global_step, train_examples=len(train), data=data_desc,
                                train_seconds=train_seconds, wall_seconds=time.perf_counter() - started,
                                cpu_seconds=time.process_time(),
                                model_dir=str(model_dir), plots=plots)
    log.info("finetune done: %s %s = %.4f (dev, %d examples), model in %s, %.0f s", t.name, metrics["main_metric"],
             metrics[metrics["main_metric"]], metrics["num_examples"], model_dir, time.perf_counter() - started)
    return result


def prune(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Fine-prune a model with CAPTrainer (CAP or a plain baseline); saves ``<output_dir>/compressed``."""
    from ..cap.trainer import CAPTrainer
    from ..export import export_compressed, is_compressed_dir

    o = resolve(options, **overrides)
    t = get_task(o["task"])
    squad = is_squad_task(t)
    if o["model"] not in (None, "default") and is_compressed_dir(o["model"]):
        raise ValueError(f"--model: {o['model']!r} is a compressed export; prune starts from a dense transformers "
                         f"model directory")
    cap_config = build_cap_config(o, has_teacher=o["teacher"] is not None)
    if squad:
        check_squad_cap_config(cap_config)
    sources = tasks.squad_sources(t, o)
    label = method_label(cap_config)
    out = Path(o["output_dir"] or default_output_dir(f"prune-{label}", t.name))
    run = RunDir(out, command="prune")
    o["output_dir"] = str(out)
    run.write_config(o, cap_config=cap_config.to_dict())
    seed_everything(o["seed"])
    started = time.perf_counter()
    model, tokenizer = tasks.load_model(t, o["model"])
    teacher = tasks.load_teacher(o["teacher"], t) if o["teacher"] else None
    if teacher is None and (cap_config.w_kd > 0 or "fic" in cap_config.active_banks):
        log.warning("no --teacher: CAPTrainer first fine-tunes a dense copy for teacher_epochs=%g epochs (set "
                    "--teacher to reuse one, or --cap-option w_kd=0 with --no-cap for no teacher)",
                    cap_config.teacher_epochs)
    train, dev, data_desc = tasks.load_train_dev(t, tokenizer, o, sources)
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
                         callbacks=[ConsoleLogCallback()])
    train_out = trainer.train()
    train_seconds = time.perf_counter() - started
    if not run.writes:
        return other_rank_result("prune", trainer)
    model = trainer.model
    report = trainer.sparsity_report()
    compacted = None
    if getattr(cap_config, "structured", False):
        compacted = trainer.compact()
    trainer.finalize()  # drop score parameters and hooks: plain SparseLinear layers with their masks remain
    metrics = tasks.evaluate_task(t, model, tokenizer, dev, o, desc="eval dev", out=out)
    export_dir = out / "compressed"
    meta = export_compressed(model, export_dir, tokenizer=tokenizer,
                             extra_metadata={"task": t.name, "method": label, "cap_config": cap_config.to_dict(),
                                             "eval": metrics})
    plots = save_history(trainer, out, target_sparsity=getattr(cap_config, "target_sparsity", None))
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


def evaluate(options: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """Evaluate a transformers directory or a compressed export on a GLUE split (or SQuAD: exact match / F1)."""
    from ..cap.trainer import is_qa_model
    from ..export import encoder_sparsity, load_any

    o = resolve(options, **overrides)
    t = get_task(o["task"])
    squad = is_squad_task(t)
    if squad:
        check_squad_options(o)
    source = squad_source(o, o["split"]) if squad else None  # before loading anything
    model, tokenizer = load_any(o["model"], question_answering=squad)
    if squad:
        tasks.check_qa_checkpoint(model, o["model"], "--model")
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
    metrics = tasks.evaluate_task(t, model, tokenizer, data, o, desc=f"eval {o['split']}",
                        out=Path(o["output_dir"]) if run else None)
    sp = encoder_sparsity(model)
    metrics["sparsity"] = sp["global"] if sp["total"] else 0.0
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

    o = resolve(options, **overrides)
    src = o["model"]
    out = Path(o["output_dir"] or default_output_dir("export", None))
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


def predict(options: Optional[Dict[str, Any]] = None, **overrides) -> List[Dict[str, Any]]:
    import sys

    import torch

    from ..export import load_any

    from ..cap.trainer import is_qa_model

    o = resolve(options, **overrides)
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
    for r in results:
        if o.get("json"):
            print(json.dumps(r))
        elif "score" in r:
            print(f"{r['score']:.4f}\t{r['text']}")
        else:
            print(f"{r['label']}\t{max(r['probabilities']):.3f}\t{r['text']}")
    return results
