"""Benchmark of the ``cpu`` backend's block-sparse linear kernels against dense ``F.linear`` (MKL)
and torch BSR (``torch.sparse.mm(W_bsr, X^T)``), measured in the same run.

    python benchmarks/bench_kernels_cpu.py            # full sweep (several minutes on 2 cores)
    python benchmarks/bench_kernels_cpu.py --quick    # < 2 minutes
    capsparse bench kernels --device cpu              # the same, through the CLI

Writes ``cpu_kernels.csv``, ``cpu_kernels.json`` (rows + machine + summary) and ``cpu_kernels.png``
(speedup vs sparsity) to ``--output-dir`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from capsparse.layout import build_block_metadata, expand_bitmap

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (in K, out N)
    "bert_up": (768, 3072),
    "bert_down": (3072, 768),
    "bert_attn": (768, 768),
    "mini_up": (384, 1536),
    "mini_down": (1536, 384),
}
OPS = ("fwd", "dx", "dw", "fwdbwd")
CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of all threads)


def block_meta(bitmap: torch.Tensor):
    """Block-layout metadata of docs/design.md from a bool bitmap ``[R, C]`` (capsparse.layout's builder)."""
    m = build_block_metadata(bitmap)
    m["block_cols"] = m["row_cols"]
    return m


def random_bitmap(r: int, c: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``round((1 - sparsity) * r * c)`` kept blocks, uniformly at random."""
    keep = int(round((1.0 - sparsity) * r * c))
    flat = torch.zeros(r * c, dtype=torch.bool)
    flat[torch.randperm(r * c, generator=gen)[:keep]] = True
    return flat.view(r, c)


def timeit(fn, warmup: int, repeats: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        ts.append((CLOCK() - t0) * 1e3)
    return {"ms": statistics.median(ts), "ms_min": min(ts), "ms_max": max(ts)}


def timeit_pair(fn, ref, warmup: int, repeats: int):
    """Time ``fn`` and ``ref`` alternately (A/B/A/B...), so both see the same machine load.

    The machine is shared and noisy, so each ratio is taken between samples measured side by side.
    """
    for _ in range(warmup):
        fn()
        ref()
    a, b = [], []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        t1 = CLOCK()
        ref()
        t2 = CLOCK()
        a.append((t1 - t0) * 1e3)
        b.append((t2 - t1) * 1e3)
    st = lambda v: {"ms": statistics.median(v), "ms_min": min(v), "ms_max": max(v)}  # noqa: E731
    return st(a), st(b)


def machine_info() -> Dict[str, str]:
    model = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    from capsparse.backends import cpu
    ok, reason = cpu.is_available()
    return {"cpu": model, "cores": str(os.cpu_count()), "threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_sha": sha,
            "extension": reason if ok else f"unavailable: {reason}",
            "loadavg_start": " ".join(f"{v:.1f}" for v in os.getloadavg())}


def parse_args(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sweep, finishes in under 2 minutes")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke config (for tests)")
    p.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None, help="T (default 4096)")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)}")
    p.add_argument("--sparsities", default=None, help="comma list, e.g. 0,0.5,0.9")
    p.add_argument("--blocks", default=None, help="comma list, e.g. 16,32,64")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-bsr", action="store_true", help="skip the torch BSR comparison")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: CPU time of the process (all threads) instead of wall time; for a loaded machine, "
                        "run with OMP_WAIT_POLICY=passive so waiting threads do not spin")
    p.add_argument("--ops", default=None, help=f"comma list of {OPS}")
    p.add_argument("--tag", default="", help="suffix of the output names: cpu_kernels<tag>.csv (e.g. .t1)")
    return p.parse_args(argv)


def config(args):
    if args.tiny:
        cfg = dict(tokens=64, shapes=["mini_attn_tiny"], sparsities=[0.5, 0.9], blocks=[16, 32], repeats=2, warmup=1)
    elif args.quick:
        cfg = dict(tokens=4096, shapes=["bert_up", "bert_attn"], sparsities=[0.5, 0.9, 0.97],
                   blocks=[32, 64], repeats=3, warmup=1)
    else:
        cfg = dict(tokens=4096, shapes=list(SHAPES), sparsities=[0.0, 0.5, 0.7, 0.9, 0.97], blocks=[16, 32, 64],
                   repeats=5, warmup=1)
    if args.tokens:
        cfg["tokens"] = args.tokens
    if args.shapes:
        cfg["shapes"] = args.shapes.split(",")
    if args.sparsities:
        cfg["sparsities"] = [float(s) for s in args.sparsities.split(",")]
    if args.blocks:
        cfg["blocks"] = [int(b) for b in args.blocks.split(",")]
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.warmup is not None:
        cfg["warmup"] = args.warmup
    cfg["ops"] = args.ops.split(",") if args.ops else list(OPS)
    cfg["clock"] = args.clock
    return cfg


def write_rows(rows: List[dict], out_dir: Path, extra: dict, tag: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(out_dir / f"cpu_kernels{tag}.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)
    with open(out_dir / f"cpu_kernels{tag}.json", "w") as fh:
        json.dump(dict(extra, rows=rows), fh, indent=1)


def run(cfg, bsr: bool, log=print, checkpoint=None) -> List[dict]:
    from capsparse.backends import cpu
    shapes = dict(SHAPES, mini_attn_tiny=(64, 128))
    gen = torch.Generator().manual_seed(0)
    t = cfg["tokens"]
    rows: List[dict] = []
    for name in cfg["shapes"]:
        k, n = shapes[name]
        x = torch.randn(t, k, generator=gen)
        w = torch.randn(n, k, generator=gen) / math.sqrt(k)
        b = torch.randn(n, generator=gen)
        gy = torch.randn(t, n, generator=gen)
        out = torch.empty(t, n)
        tm = lambda fn: timeit(fn, cfg["warmup"], cfg["repeats"])  # noqa: E731

        def dense_fwdbwd():
            F.linear(x, w, b)
            gy @ w
            gy.t() @ x
            gy.sum(0)

        # kernel level, like with like: both forwards write into the same preallocated ``out``
        dense_fns = {"fwd": lambda: torch.addmm(b, x, w.t(), out=out), "dx": lambda: gy @ w, "dw": lambda: gy.t() @ x,
                     "fwdbwd": dense_fwdbwd}
        dense = {op: tm(fn) for op, fn in dense_fns.items() if op in cfg.get("ops", OPS)}
        for op, r in dense.items():
            rows.append(dict(shape=name, K=k, N=n, T=t, block=0, sparsity=0.0, op=op, impl="dense", **r,
                             speedup_vs_dense=1.0, speedup_vs_bsr=None, dense_ms=r["ms"], dense_ms_min=r["ms_min"]))
        log(f"{name} {k}->{n} T={t}: dense " + ", ".join(f"{op} {r['ms']:.1f} ms" for op, r in dense.items()))
        for blk in cfg["blocks"]:
            if n % blk or k % blk:
                continue
            for sp in cfg["sparsities"]:
                bitmap = random_bitmap(n // blk, k // blk, sp, gen)
                md = block_meta(bitmap)
                fns = {
                    "fwd": lambda: cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], blk, blk, out=out),
                    "dx": lambda: cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], blk, blk),
                    "dw": lambda: cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], blk,
                                                      blk),
                }

                def fwdbwd():
                    cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], blk, blk)
                    fns["dx"]()
                    fns["dw"]()
                    gy.sum(0)

                fns["fwdbwd"] = fwdbwd
                bsr_ms = None
                if bsr and sp >= 0.7:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        mask = expand_bitmap(bitmap, (blk, blk))
                        w_bsr = (w * mask).to_sparse_bsr((blk, blk))
                        xt = x.t().contiguous()
                        r, d = timeit_pair(lambda: torch.sparse.mm(w_bsr, xt), dense_fns["fwd"], cfg["warmup"],
                                           cfg["repeats"])
                    r["dense_ms"], r["dense_ms_min"] = d["ms"], d["ms_min"]
                    rows.append(dict(shape=name, K=k, N=n, T=t, block=blk, sparsity=sp, op="fwd", impl="torch_bsr",
                                     **r, speedup_vs_dense=d["ms"] / r["ms"], speedup_vs_bsr=1.0))
                    bsr_ms = r["ms"]
                msg = []
                for op in cfg.get("ops", OPS):
                    r, d = timeit_pair(fns[op], dense_fns[op], cfg["warmup"], cfg["repeats"])
                    sd = d["ms"] / r["ms"]
                    r["dense_ms"] = d["ms"]
                    r["dense_ms_min"] = d["ms_min"]
                    sb = bsr_ms / r["ms"] if (op == "fwd" and bsr_ms) else None
                    rows.append(dict(shape=name, K=k, N=n, T=t, block=blk, sparsity=sp, op=op, impl="capsparse_cpu",
                                     **r, speedup_vs_dense=sd, speedup_vs_bsr=sb))
                    msg.append(f"{op} {r['ms']:.1f}ms {sd:.2f}x" + (f" (bsr {bsr_ms:.1f}ms, {sb:.2f}x)" if sb else ""))
                log(f"  b{blk} sp{sp:.2f}: " + " | ".join(msg))
        if checkpoint is not None:  # partial results survive an interrupted full sweep
            checkpoint(rows)
    return rows


def geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def summarize(rows: List[dict]) -> dict:
    ours = [r for r in rows if r["impl"] == "capsparse_cpu"]
    summary: dict = {"crossover_sparsity_fwd": {}, "geomean_speedup": {}, "min_speedup": {}, "vs_bsr_90": {}}
    for blk in sorted({r["block"] for r in ours}):
        sps = sorted({r["sparsity"] for r in ours if r["block"] == blk})
        cross = None
        for sp in sps:  # lowest measured sparsity from which the forward is >= dense on every shape
            if all(r["speedup_vs_dense"] >= 1.0 for r in ours if r["block"] == blk and r["op"] == "fwd"
                   and r["sparsity"] >= sp):
                cross = sp
                break
        summary["crossover_sparsity_fwd"][str(blk)] = cross
        for sp in sps:
            for op in OPS:
                v = [r["speedup_vs_dense"] for r in ours if r["block"] == blk and r["sparsity"] == sp and r["op"] == op]
                key = f"b{blk}/sp{sp:g}/{op}"
                summary["geomean_speedup"][key] = geomean(v)
                summary["min_speedup"][key] = min(v) if v else None
        v = [r["speedup_vs_bsr"] for r in ours if r["block"] == blk and r["sparsity"] == 0.9 and r["speedup_vs_bsr"]]
        summary["vs_bsr_90"][str(blk)] = {"geomean": geomean(v), "min": min(v) if v else None}
    return summary


def table(rows: List[dict]) -> str:
    ours = [r for r in rows if r["impl"] == "capsparse_cpu"]
    bsr = {(r["shape"], r["block"], r["sparsity"]): r for r in rows if r["impl"] == "torch_bsr"}
    lines = ["| shape | block | sparsity | fwd | dX | dW | fwd+bwd | torch BSR fwd | ours vs BSR |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["shape"], r["block"], r["sparsity"]) for r in ours},
                  key=lambda k: (list(SHAPES).index(k[0]) if k[0] in SHAPES else 99, k[1], k[2]))
    for key in keys:
        cell = {r["op"]: r for r in ours if (r["shape"], r["block"], r["sparsity"]) == key}
        b = bsr.get(key)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:.0%} | " + " | ".join(
            f"{cell[op]['speedup_vs_dense']:.2f}x" if op in cell else "-" for op in OPS) +
            (f" | {b['speedup_vs_dense']:.2f}x | {cell['fwd']['speedup_vs_bsr']:.2f}x |" if b and 'fwd' in cell
             else " | - | - |"))
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours = [r for r in rows if r["impl"] == "capsparse_cpu"]
    fig, axes = plt.subplots(1, len(OPS), figsize=(4.2 * len(OPS), 3.6), sharey=True)
    for ax, op in zip(axes, OPS):
        for blk in sorted({r["block"] for r in ours}):
            sps = sorted({r["sparsity"] for r in ours if r["block"] == blk})
            ys = [geomean([r["speedup_vs_dense"] for r in ours if r["block"] == blk and r["sparsity"] == sp
                           and r["op"] == op]) for sp in sps]
            ax.plot([100 * s for s in sps], ys, marker="o", label=f"capsparse cpu b{blk}")
        if op == "fwd":
            bsr = [r for r in rows if r["impl"] == "torch_bsr"]
            for blk in sorted({r["block"] for r in bsr}):
                sps = sorted({r["sparsity"] for r in bsr if r["block"] == blk})
                ys = [geomean([r["speedup_vs_dense"] for r in bsr if r["block"] == blk and r["sparsity"] == sp])
                      for sp in sps]
                ax.plot([100 * s for s in sps], ys, ls="--", marker="x", label=f"torch BSR b{blk}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{op} (geomean over shapes)")
        ax.set_xlabel("block sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup vs dense F.linear")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    from capsparse.backends import cpu
    ok, reason = cpu.is_available()
    if not ok:
        raise SystemExit(f"bench_kernels_cpu: {reason}")
    cfg = config(args)
    info = machine_info()
    print(f"# {info['cpu']} | torch {info['torch']} | threads {info['threads']} | {info['extension']} | "
          f"{info['date']} | git {info['git_sha']}")
    t0 = time.perf_counter()
    out_dir = Path(args.output_dir)
    command = "python benchmarks/bench_kernels_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    base = {"machine": info, "config": cfg, "command": command}
    rows = run(cfg, bsr=not args.no_bsr,
               checkpoint=lambda rs: write_rows(rs, out_dir, dict(base, partial=True, summary=summarize(rs)), args.tag))
    summary = summarize(rows)
    info["loadavg_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    write_rows(rows, out_dir, dict(base, partial=False, summary=summary, seconds=time.perf_counter() - t0), args.tag)
    print(table(rows))
    print("crossover sparsity (fwd >= dense on every shape):", summary["crossover_sparsity_fwd"])
    if not args.no_plot:
        try:
            plot(rows, out_dir / f"cpu_kernels{args.tag}.png")
        except ImportError as exc:
            print(f"(no plot: {exc})")
    print(f"wrote {out_dir}/cpu_kernels{args.tag}.{{csv,json,png}} in {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
