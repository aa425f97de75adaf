#!/usr/bin/env python
"""Why short movement-pruning runs collapse: which weights do movement scores remove after a short dense phase?

Takes a fine-tuned SST-2 model, trains capsparse's movement scores on it for ``--steps`` optimizer steps exactly as
``capsparse prune --method movement`` does in its dense phase (straight-through scores, AdamW lr 1e-2 for the
scores, the weights' lr from ``--weight-lr``), and accumulates the first-order Taylor term ``-sum_t g_t * W``
alongside. It then prunes the same fraction of every encoder linear by several criteria and evaluates each
masked model on SST-2 dev, with no retraining:

- ``movement``: capsparse's learned movement scores from zero (top-k, as the official pruner does);
- ``anchored``: the same learned scores started from the per-matrix standardised ``|W|``
  (``score_init_mode="magnitude"``, capsparse's default); with ``--weight-lr 0`` the score updates do not depend on
  the scores, so this is exactly the anchor plus the learned movement;
- ``magnitude``: ``|W|``;
- ``random``: uniform random scores (seeded);
- ``signed-taylor``: ``-sum_t g_t * W`` (movement's score under plain SGD);
- ``abs-taylor``: ``|sum_t g_t * W|`` (first-order saliency, no sign).

It also reports how many of the 1% most salient weights each mask removes. Saliency (``|sum_t g_t * W|``) is
measured on a second, independent stream of training batches (``--importance-stream independent``, the default),
so that it is not circular with the scores; and how the score group's Adam second moment sits relative to its
``eps`` (``--eps``): the share of scores with ``sqrt(v) < 10 eps`` and its rank correlation with saliency.

    python scripts/movement_probe.py --model runs/results-v2/dense/seed0/model --out runs/movement-probe

Writes ``<out>/probe.json`` and ``<out>/probe.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CRITERIA = ("movement", "anchored", "magnitude", "random", "signed-taylor", "abs-taylor")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="fine-tuned SST-2 sequence-classification model directory")
    p.add_argument("--out", default="runs/movement-probe", help="output directory")
    p.add_argument("--steps", type=int, default=30, help="dense optimizer steps that train the movement scores")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-examples", type=int, default=2000, help="SST-2 training subset")
    p.add_argument("--weight-lr", type=float, default=0.0,
                   help="weight learning rate during the probe (0: only the scores move, so every criterion "
                        "masks the same weights)")
    p.add_argument("--score-lr", type=float, default=1e-2, help="score learning rate (official: 1e-2)")
    p.add_argument("--anchor-scales", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                   help="score_init_scale values of the anchored criterion (anchor = scale * standardised |W|)")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW eps of the score group (torch default 1e-8)")
    p.add_argument("--importance-stream", choices=("independent", "same"), default="independent",
                   help="batches that measure saliency: a second stream of training batches, or the scores' own")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.135, 0.3, 0.5],
                   help="fractions of each encoder linear to prune")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--glue-dir", default=None)
    a = p.parse_args(argv)
    for f in a.fractions:
        if not 0.0 < f < 1.0:
            p.error(f"--fractions: expected values in (0, 1), got {f}")
    if a.steps < 1:
        p.error(f"--steps: expected >= 1, got {a.steps}")

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import capsparse
    from capsparse.layout import topk_mask
    from capsparse.app.tasks import load_split
    from capsparse.pruning.pruners import build_pruner
    from capsparse.runlog import machine_info

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    dev = load_split("sst2", tok, "validation", glue_dir=a.glue_dir, max_length=a.max_length)
    train = load_split("sst2", tok, "train", glue_dir=a.glue_dir, max_length=a.max_length,
                       max_examples=a.train_examples, seed=a.seed)

    def batch(ds, idx):
        rows = ds[idx]
        enc = tok.pad({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}, return_tensors="pt")
        return enc, torch.tensor(rows["labels"])

    @torch.no_grad()
    def accuracy(model) -> float:
        model.eval()
        correct = 0
        for i in range(0, len(dev), 128):
            enc, y = batch(dev, list(range(i, min(i + 128, len(dev)))))
            correct += int((model(**enc).logits.argmax(-1) == y).sum())
        return correct / len(dev)

    model = AutoModelForSequenceClassification.from_pretrained(a.model)
    capsparse.sparsify(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, capsparse.nn.SparseLinear)]
    pruner = build_pruner("movement", model, layers=layers, score_init_mode="constant")  # learned part alone
    scores = pruner.score_parameters()
    score_ids = {id(s) for s in scores}
    weights = [q for q in model.parameters() if id(q) not in score_ids]
    opt = torch.optim.AdamW([{"params": weights, "lr": a.weight_lr, "weight_decay": 0.0},
                             {"params": scores, "lr": a.score_lr, "weight_decay": 0.0, "eps": a.eps}])
    taylor = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers}
    importance = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers}
    order = list(range(len(train)))
    random.Random(a.seed).shuffle(order)
    # the second stream: the other half of the shuffled subset, so its batches share no example with the scores'
    half = len(order) // 2
    order, order_b = (order[:half], order[half:]) if a.importance_stream == "independent" else (order, order)
    dense_acc = accuracy(model)
    model.train()
    start = time.time()
    for step in range(a.steps):
        lo = (step * a.batch_size) % max(1, len(order) - a.batch_size)
        enc, y = batch(train, order[lo:lo + a.batch_size])
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        opt.zero_grad()
        loss.backward()
        for n, m in layers:
            taylor[n] -= m.movement_scores.grad.float()  # the score gradient is g * W
        if a.importance_stream == "independent":
            lo_b = (step * a.batch_size) % max(1, len(order_b) - a.batch_size)
            enc_b, y_b = batch(train, order_b[lo_b:lo_b + a.batch_size])
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(**enc_b).logits, y_b), scores)
            for (n, _), g in zip(layers, grads):
                importance[n] -= g.float()
        else:
            for n, _ in layers:
                importance[n].copy_(taylor[n])
        opt.step()
    train_seconds = time.time() - start
    # where the score group's second moment sits relative to eps, and whether that tracks saliency
    beta2 = 0.999
    v_stats = []
    for n, m in layers:
        v = opt.state[m.movement_scores]["exp_avg_sq"] / (1 - beta2 ** a.steps)
        root_v, sal = v.sqrt().flatten(), importance[n].abs().flatten()
        v_stats.append((float((root_v < 10 * a.eps).float().mean()), _spearman(root_v, sal),
                        float(root_v.median())))
    near_eps = sum(x[0] for x in v_stats) / len(v_stats)
    rank_corr = sum(x[1] for x in v_stats) / len(v_stats)
    median_root_v = sorted(x[2] for x in v_stats)[len(v_stats) // 2]
    print(f"score second moment: {100 * near_eps:.2f}% of scores have sqrt(v) < 10*eps ({a.eps:g}); median "
          f"sqrt(v) {median_root_v:.3g}; Spearman(sqrt(v), saliency) {rank_corr:.3f} (mean over matrices)",
          flush=True)
    learned = {n: m.movement_scores.detach().clone() for n, m in layers}
    weights_now = {n: m.weight.detach().float().clone() for n, m in layers}
    pruner.remove()
    gen = torch.Generator().manual_seed(a.seed)
    rand = {n: torch.rand(w.shape, generator=gen) for n, w in weights_now.items()}
    from capsparse.pruning.pruners import magnitude_anchor

    anchors = {n: magnitude_anchor(m) for n, m in layers}  # weights are unchanged with --weight-lr 0
    criterion_scores = {
        "movement": learned,
        **{_anchored(sc): {n: sc * anchors[n] + learned[n] for n in learned} for sc in a.anchor_scales},
        "magnitude": {n: w.abs() for n, w in weights_now.items()},
        "random": rand,
        "signed-taylor": taylor,
        "abs-taylor": {n: t.abs() for n, t in taylor.items()},
    }
    # the 1% most salient weights of each matrix by |sum g * W| on the importance stream
    salient = {n: t.abs() >= t.abs().flatten().kthvalue(max(1, int(0.99 * t.numel()))).values
               for n, t in importance.items()}
    criteria = [c for c in CRITERIA if c != "anchored"]
    criteria[1:1] = [_anchored(sc) for sc in a.anchor_scales]
    rows = []
    for frac in a.fractions:
        for crit in criteria:
            removed_salient, n_salient = 0, 0
            for n, m in layers:
                keep = topk_mask(criterion_scores[crit][n], 1.0 - frac)
                m.set_mask(keep)
                removed_salient += int((~keep & salient[n]).sum())
                n_salient += int(salient[n].sum())
            rows.append({"fraction_pruned": frac, "criterion": crit, "dev_accuracy": accuracy(model),
                         "salient_removed": removed_salient / n_salient})
            print(f"pruned {frac:.3f} by {crit:14s}: SST-2 dev acc {100 * rows[-1]['dev_accuracy']:.2f}%, "
                  f"top-1% salient weights removed {100 * rows[-1]['salient_removed']:.1f}%", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(a), "criteria": criteria, "dense_accuracy": dense_acc, "rows": rows, "train_seconds": train_seconds,
              "second_moment": {"share_below_10eps": near_eps, "spearman_sqrt_v_saliency": rank_corr,
                                "median_sqrt_v": median_root_v},
              "machine": machine_info(), "finished": dt.datetime.now().isoformat(timespec="seconds")}
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    lines = [f"Dense model: {100 * dense_acc:.2f}% SST-2 dev. Scores after {a.steps} steps (batch {a.batch_size}, "
             f"score lr {a.score_lr:g}, eps {a.eps:g}, weight lr {a.weight_lr:g}; saliency from the "
             f"{a.importance_stream} stream); masks applied with no retraining.",
             f"Score second moment: {100 * near_eps:.2f}% of scores below sqrt(v) = 10 eps; median sqrt(v) "
             f"{median_root_v:.3g}; Spearman(sqrt(v), saliency) {rank_corr:.3f}.", "",
             "| pruned | " + " | ".join(criteria) + " |", "|---|" + "---|" * len(criteria)]
    for frac in a.fractions:
        cells = []
        for crit in criteria:
            r = next(r for r in rows if r["fraction_pruned"] == frac and r["criterion"] == crit)
            cells.append(f"{100 * r['dev_accuracy']:.1f}% ({100 * r['salient_removed']:.0f}%)")
        lines.append(f"| {100 * frac:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "Cells: SST-2 dev accuracy of the masked model (share of the 1% most salient weights, by "
                  "|sum g*W|, that the mask removes)."]
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _anchored(scale: float) -> str:
    return f"anchored x{scale:g}"


def _spearman(x, y) -> float:
    """Rank correlation of two flat tensors (ties broken by position; fine at this size)."""
    import torch

    rx = torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(x.numel(), dtype=x.dtype))
    ry = torch.empty_like(y).scatter_(0, y.argsort(), torch.arange(y.numel(), dtype=y.dtype))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))


if __name__ == "__main__":
    sys.exit(main())
