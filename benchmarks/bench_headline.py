"""The headline rows from one run: sparse vs dense where users call them.

Sections (each candidate is timed round-robin with its dense baseline under the same rules: same
thread count, same allocator setting, both outputs fresh unless the row says ``kernel-level``):

* ``module``: ``SparseLinear`` (block 32) vs ``nn.Linear`` on the BERT-base shapes (FFN up 768->3072,
  FFN down 3072->768, attention 768->768), batch 32 and 64 at length 128 (T = 4096 / 8192 tokens),
  90% and 97%: forward (``no_grad``) and forward + backward (dX, dW, db). Kernel-level rows time
  ``bsl_forward`` vs ``torch.mm`` both into a preallocated ``out=`` (no module, no allocation).
* ``train``: one CAP step of the default model (batch 32, length 128) with block-32 layers at 90%
  vs plain dense fine-tuning and vs the official-style step (``bench_train_step``).
* ``inference``: the default model exported (``export_compressed``) at 90% with block-32 and with
  unstructured masks, loaded with ``load_compressed``, vs the dense model; batch 1 / 8 / 32, length 128.

``--malloc tuned`` (default) calls ``capsparse.backends.cpu.configure_allocator()`` first (glibc keeps
large freed blocks for reuse, so a fresh output costs no page faults); ``--malloc default`` leaves glibc
as it is. The setting applies to the baseline and the candidate alike and is recorded in the JSON.

    python benchmarks/bench_headline.py            # full headline (about 3 min on 2 idle cores)
    python benchmarks/bench_headline.py --quick    # tiny shapes, small batches (a smoke run)
    capsparse bench                                 # the same through the CLI
"""
from __future__ import annotations

import gc
import math
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

SHAPES = {"ffn_up": (768, 3072), "ffn_down": (3072, 768), "attn": (768, 768)}  # (in, out)
QUICK_SHAPES = {"ffn_up": (128, 256), "ffn_down": (256, 128)}


def random_block_mask(n: int, k: int, b: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``round((1 - sparsity) * blocks)`` kept blocks, uniformly at random."""
    r, c = n // b, k // b
    keep = int(round((1.0 - sparsity) * r * c))
    flat = torch.zeros(r * c, dtype=torch.bool)
    flat[torch.randperm(r * c, generator=gen)[:keep]] = True
    return flat.view(r, c)


def _geomean(values: List[float]) -> float:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# -- module section --------------------------------------------------------------------------------------
def module_rows(shapes: Dict[str, tuple], tokens: List[int], sparsities: List[float], block: int, warmup: int,
                reps: int) -> List[dict]:
    from capsparse.backends import cpu
    from capsparse.nn import SparseLinear
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape, (k, n) in shapes.items():
        for t in tokens:
            dense = nn.Linear(k, n)
            x = torch.randn(t, k, generator=gen)
            gy = torch.randn(t, n, generator=gen)
            sparse = {}
            for s in sparsities:
                layer = SparseLinear.from_linear(nn.Linear(k, n), block_size=block)
                layer.set_mask(random_block_mask(n, k, block, s, gen))
                sparse[s] = layer
            xg = x.clone().requires_grad_(True)

            def fwd(m):
                def run():
                    with torch.no_grad():
                        return m(x)
                return run

            def fwd_bwd(m):
                def run():
                    m(xg).backward(gy)
                return run

            def zero(m):
                def run():
                    xg.grad = None
                    for p in m.parameters():
                        p.grad = None
                return run

            common = dict(shape=shape, in_features=k, out_features=n, tokens=t, block=block)
            # forward
            fns = {"dense": fwd(dense), **{s: fwd(m) for s, m in sparse.items()}}
            res = H.measure_interleaved(fns, warmup, reps)
            rows += _ratio_rows(res, common, "module forward (no_grad, fresh outputs)")
            # forward + backward
            fns = {"dense": fwd_bwd(dense), **{s: fwd_bwd(m) for s, m in sparse.items()}}
            setups = {"dense": zero(dense), **{s: zero(m) for s, m in sparse.items()}}
            res = H.measure_interleaved(fns, warmup, reps, setup_fns=setups)
            rows += _ratio_rows(res, common, "module forward+backward (fresh outputs)")
            # kernel level: both products into a preallocated out= (no module, no allocation)
            out = torch.empty(t, n)
            w = dense.weight.detach()
            fns = {"dense": lambda: torch.mm(x, w.t(), out=out)}
            for s, m in sparse.items():
                lay = m.layout
                fns[s] = (lambda m=m, lay=lay: cpu.bsl_forward(x, m.weight.detach(), None, lay.row_ptr, lay.row_cols,
                                                               block, block, out=out))
            res = H.measure_interleaved(fns, warmup, reps)
            rows += _ratio_rows(res, common, "kernel-level forward (both out=, no bias)")
            del dense, sparse, x, gy, xg, out
            gc.collect()
    return rows


def _ratio_rows(res: Dict, common: dict, what: str) -> List[dict]:
    rows = []
    base = res.get("dense", {})
    for key, r in res.items():
        if key == "dense":
            continue
        row = dict(section="module", what=what, **common, sparsity=key)
        if "error" in r or "error" in base:
            row["status"] = H.not_available(r.get("error") or base.get("error"))
            rows.append(row)
            continue
        rows.append(dict(row, dense_ms=base["median_ms"], sparse_ms=r["median_ms"],
                         speedup=H.ratio(base["median_ms"], r["median_ms"]),
                         speedup_min=H.ratio(base["min_ms"], r["min_ms"]), reps=r["reps"]))
    return rows


# -- training step section ---------------------------------------------------------------------------------
def train_rows(model_name: str, batch: int, length: int, sparsity: float, warmup: int, reps: int,
               block_score_mode: str) -> List[dict]:
    import argparse

    import bench_train_step as T
    base = T.build_model(model_name)
    args = argparse.Namespace(n_examples=4096, extra_keys=4096, block_score_mode=block_score_mode)
    got = T.group_rows(model_name, base, sparsity, batch, length, args, "cpu", warmup, reps,
                       variants=("capsparse block32", "official-style", "dense fine-tune"), memory=False)
    by = {r["variant"]: r for r in got if r.get("status", H.OK) == H.OK}
    rows = []
    cand = by.get("capsparse block32")
    for ref in ("dense fine-tune", "official-style"):
        row = dict(section="train", what=f"CAP step (block 32, {block_score_mode} scores) vs {ref}",
                   shape=model_name, tokens=batch * length, block=32, sparsity=sparsity)
        if cand is None or ref not in by:
            row["status"] = H.not_available("a variant failed: " + "; ".join(
                str(r.get("status")) for r in got if r.get("status", H.OK) != H.OK))
        else:
            row.update(dense_ms=by[ref]["median_ms"], sparse_ms=cand["median_ms"],
                       speedup=H.ratio(by[ref]["median_ms"], cand["median_ms"]),
                       speedup_min=H.ratio(by[ref]["min_ms"], cand["min_ms"]), reps=cand["reps"])
        rows.append(row)
    del base
    gc.collect()
    return rows


# -- exported inference section ------------------------------------------------------------------------------
def inference_rows(model_name: str, layouts: List[str], sparsity: float, batches: List[int], length: int,
                   warmup: int, reps: int) -> List[dict]:
    import bench_inference as I
    from bench_train_step import build_model
    rows = []
    base = build_model(model_name).eval()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"dense": base}
        for layout in layouts:
            try:
                variants[layout] = I.build_variant(base, layout, sparsity, Path(tmp))[0]
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(section="inference", what=f"exported {layout}", shape=model_name, sparsity=sparsity,
                                 status=H.not_available(f"{type(exc).__name__}: {exc}")))
        for b in batches:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, base.config.vocab_size, (b, length), generator=g)
            mask = torch.ones_like(ids)
            fns = {}
            for name, model in variants.items():
                def fn(model=model):
                    with torch.inference_mode():
                        return model(input_ids=ids, attention_mask=mask).logits
                fns[name] = fn
            res = H.measure_interleaved(fns, warmup, reps)
            base_r = res["dense"]
            for name, r in res.items():
                if name == "dense":
                    continue
                row = dict(section="inference", what=f"exported model, {name} (load_compressed) vs dense",
                           shape=model_name, tokens=b * length, batch=b, block=32 if name == "block32" else None,
                           sparsity=sparsity)
                if "error" in r or "error" in base_r:
                    row["status"] = H.not_available(r.get("error") or base_r.get("error"))
                else:
                    row.update(dense_ms=base_r["median_ms"], sparse_ms=r["median_ms"],
                               speedup=H.ratio(base_r["median_ms"], r["median_ms"]),
                               speedup_min=H.ratio(base_r["min_ms"], r["min_ms"]), reps=r["reps"])
                rows.append(row)
    del base, variants
    gc.collect()
    return rows


# -- report ------------------------------------------------------------------------------------------------------
def summary_rows(rows: List[dict]) -> List[dict]:
    """Geometric means of the module rows per (what, tokens, sparsity)."""
    out = []
    keys = dict.fromkeys((r["what"], r["tokens"], r["sparsity"]) for r in rows
                         if r.get("section") == "module" and r.get("speedup"))
    for what, t, s in keys:
        vals = [r["speedup"] for r in rows if (r.get("what"), r.get("tokens"), r.get("sparsity")) == (what, t, s)
                and r.get("speedup")]
        out.append(dict(section="summary", what=f"geomean over shapes: {what}", shape="all", tokens=t,
                        sparsity=s, speedup=_geomean(vals)))
    return out


def plot(report: H.Report, output_dir):
    pyplot = H.plt()
    rows = [r for r in report.ok_rows() if r.get("speedup") and r["section"] != "summary"]
    labels = [f"{r['section']}: {r['what'][:38]} | {r['shape']} T={r.get('tokens')} {100 * float(r['sparsity']):g}%"
              for r in rows]
    fig, ax = pyplot.subplots(figsize=(11, max(3, 0.22 * len(rows) + 1)))
    colors = {"module": "tab:blue", "train": "tab:green", "inference": "tab:orange"}
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color=[colors.get(r["section"], "0.5") for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup vs the baseline of the row (median, same run, interleaved; log scale)")
    ax.set_title(f"capsparse headline (allocator: {report.config.get('malloc')})", fontsize=9)
    return H.save_figure(fig, report, output_dir)


COLUMNS = ["section", "what", "shape", "tokens", "sparsity", "dense_ms", "sparse_ms", "speedup", "speedup_min",
           "status"]


def main(argv=None):
    parser = H.base_parser(__doc__.split("\n")[0], reps=5)
    parser.add_argument("--sections", nargs="*", default=["module", "train", "inference"],
                        choices=["module", "train", "inference"])
    parser.add_argument("--malloc", default="tuned", choices=["tuned", "default"],
                        help="tuned: capsparse.backends.cpu.configure_allocator() first (default); default: glibc as is")
    parser.add_argument("--block-score-mode", default="exact", choices=["exact", "fast", "sampled"],
                        help="block movement-score gradient of the CAP step (see docs/benchmarks.md)")
    args = parser.parse_args(argv)
    H.setup(args.threads)
    if H.resolve_device(args) != "cpu":
        raise SystemExit("bench_headline: CPU only in this version; run with --device cpu")
    from capsparse.backends import cpu
    allocator = cpu.configure_allocator() if args.malloc == "tuned" else cpu.allocator_state()
    reps = args.reps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    report = H.Report("headline", args, "cpu")
    report.meta["allocator"] = allocator
    if "module" in args.sections:
        print("[headline] module ...", flush=True)
        report.extend(module_rows(QUICK_SHAPES if args.quick else SHAPES, [256] if args.quick else [4096, 8192],
                                  [0.9, 0.97], 32, warmup, reps))
        report.extend(summary_rows(report.rows))
    if "train" in args.sections:
        print("[headline] train ...", flush=True)
        report.extend(train_rows("tiny" if args.quick else "small", 4 if args.quick else 32, 16 if args.quick else 128,
                                 0.9, warmup, max(2, reps - 2), args.block_score_mode))
    if "inference" in args.sections:
        print("[headline] inference ...", flush=True)
        report.extend(inference_rows("tiny" if args.quick else "small", ["block32", "unstructured"], 0.9,
                                     [1, 4] if args.quick else [1, 8, 32], 16 if args.quick else 128, warmup, reps))
    report.note("speedup = baseline median / candidate median, timed round-robin in this run; speedup_min = ratio "
                "of the fastest runs. Module rows: both fresh outputs; kernel-level rows: both out=.")
    report.note(f"allocator: {allocator}")
    H.finish(report, args, plot, COLUMNS)
    return report


if __name__ == "__main__":
    main()
