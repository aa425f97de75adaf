"""Inference: the exported compressed model vs the dense model, tokens/s and file size.

For each model, sparsity (90%, 97%) and layout (block 32, unstructured) the model is pruned by magnitude
(per-matrix top-k of ``|W|``, or of block L2 norms), exported with ``capsparse.export.export_compressed``
and loaded back with ``load_compressed`` (default backend: the C++ ``cpu`` kernels when built, else the
reference). When ``capsparse.export`` is missing the in-memory ``SparseLinear`` model is timed instead and
the row says so. The dense model is the same architecture, unpruned, saved with ``save_pretrained``
(safetensors). All variants of one batch size are timed interleaved; speedup = dense median / variant
median; size ratio = dense file / compressed weights file.

    python benchmarks/bench_inference.py --quick   # small model, block 32, batch 1 and 8, length 128
    python benchmarks/bench_inference.py           # small model + BERT-base, both layouts, batch 1 and 32
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_train_step import build_model  # noqa: E402


def magnitude_prune(model, sparsity: float) -> None:
    """Per-matrix magnitude top-k on every SparseLinear (element |W| or block L2 norm)."""
    from capsparse import sparse_layers
    from capsparse.layout import topk_mask
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            w = layer.weight.detach()
            if layer.block_size is None:
                layer.set_mask(topk_mask(w.abs(), 1.0 - sparsity))
            else:
                bm, bk = layer.block_size
                n, k = w.shape
                norms = w.reshape(n // bm, bm, k // bk, bk).pow(2).sum((1, 3))
                layer.set_mask(topk_mask(norms, 1.0 - sparsity))


def build_variant(base, layout: str, sparsity: float, workdir: Path):
    """``(model, weights_bytes, how)`` of the pruned model, through export/load_compressed when available."""
    import copy
    from capsparse import sparsify
    model = copy.deepcopy(base).eval()
    sparsify(model, block_size=32 if layout == "block32" else None)
    magnitude_prune(model, sparsity)
    try:
        from capsparse.export import export_compressed, load_compressed, size_report
    except Exception as exc:  # noqa: BLE001
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return model, size, f"in-memory SparseLinear (capsparse.export not available: {type(exc).__name__})"
    out = workdir / f"{layout}-{int(round(sparsity * 100))}"
    export_compressed(model, out)
    loaded = load_compressed(out).eval()
    with torch.no_grad():
        ids = torch.randint(0, base.config.vocab_size, (2, 16))
        err = float((loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())
    return loaded, size_report(out)["weights_bytes"], f"export_compressed + load_compressed (max |dlogits| {err:.1e})"


def dense_size(model, workdir: Path) -> int:
    out = workdir / "dense"
    model.save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def plot(report: H.Report, output_dir):
    pyplot = H.plt()
    rows = report.ok_rows()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = pyplot.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == m]
        batches = sorted({r["batch"] for r in sel})
        variants = list(dict.fromkeys(r["variant"] for r in sel))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ys = [next((r["tokens_per_s"] for r in sel if r["variant"] == v and r["batch"] == b), 0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], ys, width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{m}: inference, length {sel[0]['length']}")
        ax.legend(fontsize=7)
    return H.save_figure(fig, report, output_dir)


COLUMNS = ["model", "variant", "batch", "length", "median_ms", "min_ms", "max_ms", "tokens_per_s", "speedup",
           "speedup_min", "file_mb", "size_ratio", "status"]


def main(argv=None):
    parser = H.base_parser(__doc__.split("\n")[0], reps=5)
    parser.add_argument("--models", nargs="*", default=None, choices=["small", "bert-base", "tiny"])
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.9, 0.97])
    parser.add_argument("--layouts", nargs="*", default=None, choices=["block32", "unstructured"])
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="default 1 32 (1 8 in --quick)")
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    H.setup(args.threads)
    device = "cpu"
    models = args.models or (["small"] if args.quick else ["small", "bert-base"])
    layouts = args.layouts or (["block32"] if args.quick else ["block32", "unstructured"])
    batches = args.batches or ([1, 8] if args.quick else [1, 32])
    reps = args.reps or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    report = H.Report("inference", args, device)
    for m in models:
        print(f"[inference] {m} ...", flush=True)
        base = build_model(m).eval()
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            d_size = dense_size(base, workdir)
            variants = {"dense": (base, d_size, "HF model, save_pretrained safetensors")}
            for layout in layouts:
                for s in args.sparsities:
                    name = f"{layout} {100 * s:g}%"
                    try:
                        variants[name] = build_variant(base, layout, s, workdir)
                    except Exception as exc:  # noqa: BLE001
                        report.na(f"{type(exc).__name__}: {exc}", model=m, variant=name)
            for b in batches:
                g = torch.Generator().manual_seed(0)
                ids = torch.randint(0, base.config.vocab_size, (b, args.length), generator=g)
                mask = torch.ones_like(ids)
                fns = {}
                for name, (model, _, _) in variants.items():
                    def fn(model=model):
                        with torch.inference_mode():
                            return model(input_ids=ids, attention_mask=mask).logits
                    fns[name] = fn
                res = H.measure_interleaved(fns, warmup, reps, device)
                dense_ms = res["dense"].get("median_ms")
                for name, r in res.items():
                    row = dict(model=m, variant=name, batch=b, length=args.length)
                    if "error" in r:
                        report.na(r["error"], **row)
                        continue
                    size = variants[name][1]
                    report.add(**row, median_ms=r["median_ms"], min_ms=r["min_ms"], max_ms=r["max_ms"], reps=r["reps"],
                               times_ms=r["times_ms"], tokens_per_s=b * args.length / (r["median_ms"] / 1e3),
                               speedup=H.ratio(dense_ms, r["median_ms"]),
                               speedup_min=H.ratio(res["dense"]["min_ms"], r["min_ms"]), file_mb=size / 2 ** 20,
                               size_ratio=d_size / size if size else None, how=variants[name][2])
        del base, variants
        gc.collect()
    report.note("speedup = dense median / variant median (same run, interleaved); size_ratio = dense safetensors "
                "bytes / compressed weights-file bytes; magnitude pruning per matrix (embeddings, pooler, head dense)")
    if args.quick:
        report.note("quick mode: batch 1 and 8 (full mode: 1 and 32), block 32 only, small model only")
    H.finish(report, args, plot, COLUMNS)
    return report


if __name__ == "__main__":
    main()
