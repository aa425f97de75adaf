#!/usr/bin/env python
"""Where does a collapsed pruned classifier lose its input? Per-layer input dependence of the [CLS] state.

A pruned SST-2 model that predicts one class for every sentence has a [CLS] representation that no longer depends
on the sentence. This script measures, for each model and each encoder layer, the [CLS] vector that enters the
layer's final LayerNorm (residual + FFN output) over ``--examples`` dev sentences, split into its mean over the
sentences (the input-independent part) and each sentence's deviation from that mean:

    input share = mean_i ||x_i - mean(x)|| / ||mean(x)||

A healthy model keeps this of order 1 in the last layers; when the constant part swamps the deviation, the
LayerNorm outputs nearly the same vector for every sentence and the classifier sees one input. It also reports the
spread of the logits over the sentences and the dev accuracy on the subset.

    python scripts/collapse_probe.py runs/results-v2/movement-90/seed0/compressed \\
        runs/results-v2/movement-97/seed0/compressed --out runs/collapse-probe

Takes compressed exports or ordinary transformers directories. Writes ``<out>/collapse.json`` and
``<out>/collapse.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def input_share(x) -> float:
    """Mean per-row deviation from the row mean, relative to the norm of that mean (rows = sentences)."""
    mean = x.mean(0)
    return float((x - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-12))


def probe_model(path: str, texts, labels, max_length: int) -> dict:
    """``texts``: a list of sentences, or a ``(first, second)`` pair of lists for sentence-pair tasks."""
    import torch

    from capsparse.export import load_any
    from capsparse.sparsity import encoder_layers

    model, tok = load_any(path)
    layers = encoder_layers(model)
    if not layers:
        raise SystemExit(f"{path}: no BERT-style encoder layers found (expected model.base_model.encoder.layer)")
    captured = {}
    hooks = [layer.output.LayerNorm.register_forward_hook(
        lambda m, inputs, out, i=i: captured.__setitem__(i, inputs[0][:, 0].detach().float()))
        for i, layer in enumerate(layers)]
    args = (list(texts[0]), list(texts[1])) if isinstance(texts, tuple) else (list(texts),)
    enc = tok(*args, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    try:
        with torch.no_grad():
            logits = model(**enc).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return {
        "model": path,
        "input_share_per_layer": [input_share(captured[i]) for i in range(len(layers))],
        "logit_std": float(logits.std(0).mean()),
        "accuracy": float((logits.argmax(-1) == torch.tensor(labels)).float().mean()),
        "predicted_class_share": float(torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).max()
                                       / logits.shape[0]),
    }


def markdown(rows: list, n: int, task: str = "sst2") -> str:
    layers = max(len(r["input_share_per_layer"]) for r in rows)
    head = "| model | acc (subset) | top class share | logit std | " + " | ".join(
        f"layer {i}" for i in range(layers)) + " |"
    lines = [head, "|" + "---|" * (4 + layers)]
    for r in rows:
        shares = " | ".join(f"{s:.3f}" for s in r["input_share_per_layer"])
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {100 * r['predicted_class_share']:.0f}% | "
                     f"{r['logit_std']:.4f} | {shares} |")
    return ("\n".join(lines) + f"\n\nLayer cells: input share of the [CLS] vector entering each layer's final LayerNorm "
            f"(mean ||x_i - mean(x)|| / ||mean(x)|| over {n} {TASKS[task]} dev examples).\n")


TASKS = {"sst2": "SST-2", "mrpc": "MRPC"}
TEXT_COLUMNS = {"sst2": ("sentence",), "mrpc": ("sentence1", "sentence2")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="compressed exports or transformers model directories (classifiers of "
                                             "--task)")
    p.add_argument("--task", default="sst2", choices=sorted(TASKS), help="GLUE task whose dev set is probed")
    p.add_argument("--out", default="runs/collapse-probe", help="output directory")
    p.add_argument("--examples", type=int, default=256, help="dev examples (a seeded subset)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--glue-dir", default=None)
    a = p.parse_args(argv)
    if a.examples < 2:
        p.error(f"--examples: expected >= 2 (a spread needs two sentences), got {a.examples}")
    for m in a.models:
        if not Path(m).is_dir():
            p.error(f"models: {m!r} is not a directory (expected a compressed export or a model directory)")

    import torch

    from capsparse.data.glue import load_glue

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = load_glue(a.task, "validation", glue_dir=a.glue_dir, max_examples=a.examples)
    cols = TEXT_COLUMNS[a.task]
    texts = dev[cols[0]] if len(cols) == 1 else (dev[cols[0]], dev[cols[1]])
    rows = [probe_model(m, texts, dev["label"], a.max_length) for m in a.models]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collapse.json").write_text(json.dumps({"examples": len(dev), "rows": rows}, indent=2) + "\n")
    md = markdown(rows, len(dev), a.task)
    (out / "collapse.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
