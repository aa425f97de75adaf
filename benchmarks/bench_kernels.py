"""Kernel sweep over every capsparse op and backend: forward, dX and dW against dense ``F.linear``
and torch's own sparse formats, at 0-97% sparsity, several block sizes, BERT-base and MiniLM shapes.

Providers per (shape, sparsity, pass), each timed in the same run as the dense baseline of that shape
and pass (speedup = dense median / provider median):

* ``dense``: ``F.linear(X, W)`` (fwd), ``dY @ W`` (dX), ``dY^T @ X`` (dW);
* ``torch bsr`` / ``torch csr``: ``torch.sparse.mm(W_bsr, X^T)`` and ``torch.sparse.mm(W^T_bsr, dY^T)``
  (the fastest torch paths on this CPU); dW as
  ``torch.sparse.sampled_addmm`` for CSR (BSR has no CPU sampled product);
* ``block_sparse_linear[<backend>]``: the backend primitives ``bsl_forward``, ``bsl_grad_input``,
  ``bsl_grad_weight`` for every backend (reference, cpu, triton, cuda);
* ``masked_linear[<backend>]``: ``masked_linear_forward`` per backend, and the op's dX/dW;
* ``cap_contrastive_loss``: one CAP-sized case from ``bench_contrastive`` (B = 32, D = 768, K = 4160).

Backends that cannot run are rows with ``status = "not available: <reason>"`` (on a CPU-only machine
triton and cuda say "no GPU"). The C++ CPU kernel has its own, deeper sweep in
``benchmarks/bench_kernels_cpu.py`` (``docs/benchmarks-cpu-kernels.md``); this script covers all
backends through the common primitive interface.

    python benchmarks/bench_kernels.py --quick   # MiniLM shapes, T = 512, block 32, 4 sparsities
    python benchmarks/bench_kernels.py           # full: 6 shapes, T = 4096, blocks 32/64, 7 sparsities
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import bench_contrastive  # noqa: E402

from capsparse.backends.registry import BACKENDS  # noqa: E402

# name -> (in_features K, out_features N)
SHAPES = {
    "bert_attn": (768, 768), "bert_up": (768, 3072), "bert_down": (3072, 768),
    "mini_attn": (384, 384), "mini_up": (384, 1536), "mini_down": (1536, 384),
}
QUICK_SHAPES = ("mini_attn", "mini_up", "mini_down")
FULL_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97)
QUICK_SPARSITIES = (0.0, 0.5, 0.9, 0.97)


def random_block_bitmap(n: int, k: int, b: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Uniform-random block mask with exactly ``round((1 - sparsity) * R * C)`` kept blocks (at least 1)."""
    r, c = n // b, k // b
    keep = max(1, round((1.0 - sparsity) * r * c))
    flat = torch.zeros(r * c, dtype=torch.bool)
    flat[torch.randperm(r * c, generator=gen)[:keep]] = True
    return flat.reshape(r, c)


def random_element_mask(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, k, generator=gen) >= sparsity


def _reason(name: str, device: str):
    return bench_contrastive._backend_reason(name, device)


def shape_rows(shape_name: str, t: int, sparsities, blocks, device: str, warmup: int, reps: int,
               backends=BACKENDS, passes=("fwd", "dX", "dW")) -> list:
    """Rows for one weight shape. For each (sparsity, block, pass) the dense baseline and all providers are
    timed round-robin (:func:`_harness.measure_interleaved`); speedup = dense median / provider median."""
    from capsparse.backends.registry import get_backend
    from capsparse.layout import BlockLayout

    k, n = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, k, generator=gen).to(device)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device)
    dy = torch.randn(t, n, generator=gen).to(device)
    xt, dyt = x.t().contiguous(), dy.t().contiguous()
    dense_fns = {"fwd": lambda: F.linear(x, w), "dX": lambda: dy @ w, "dW": lambda: dy.t() @ x}
    rows = []

    def run_group(op, sparsity, block, p, providers, check, unavailable):
        """providers: {label: fn}; unavailable: {label: reason}."""
        base = dict(shape=shape_name, T=t, K=k, N=n, op=op, sparsity=sparsity, block=block, pass_=p)
        errors = {}
        for label, fn in providers.items():
            try:
                errors[label] = float((fn() - check()).abs().max())
            except Exception as exc:  # noqa: BLE001 - a failing provider becomes a row
                unavailable[label] = f"{type(exc).__name__}: {str(exc)[:120]}"
        fns = {"dense F.linear": dense_fns[p]}
        fns.update({label: fn for label, fn in providers.items() if label not in unavailable})
        res = H.measure_interleaved(fns, warmup, reps, device)
        dense_ms = res["dense F.linear"]["median_ms"]
        dense_min = res["dense F.linear"]["min_ms"]
        for label, r in res.items():
            if "error" in r:
                rows.append(dict(base, provider=label, status=H.not_available(r["error"])))
                continue
            rows.append(dict(base, provider=label, **_t(r), speedup=H.ratio(dense_ms, r["median_ms"]),
                             speedup_min=H.ratio(dense_min, r["min_ms"]), cpu_ms=r["cpu_ms"],
                             speedup_cpu=H.ratio(res["dense F.linear"]["cpu_ms"], r["cpu_ms"]),
                             max_abs_err=errors.get(label)))
        for label, reason in unavailable.items():
            rows.append(dict(base, provider=label, status=H.not_available(reason)))

    for sparsity in sparsities:
        # -- block-sparse: torch BSR and every backend's primitives --------------------------------
        for b in blocks:
            bitmap = random_block_bitmap(n, k, b, sparsity, gen).to(device)
            L = BlockLayout.from_bitmap(bitmap, (n, k), b)
            mask = L.to_dense_mask()
            wm = w * mask
            ref = {"fwd": lambda: F.linear(x, wm), "dX": lambda: dy @ wm, "dW": lambda: (dy.t() @ x) * mask}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Sparse BSR tensor support is in beta"
                w_bsr = L.to_sparse_bsr(w)
                wt_bsr = wm.t().contiguous().to_sparse_bsr((b, b))
            per_pass = {p: ({}, {}) for p in passes}
            torch_fns = {"fwd": lambda: torch.sparse.mm(w_bsr, xt).t(), "dX": lambda: torch.sparse.mm(wt_bsr, dyt).t()}
            for p in passes:
                if p in torch_fns:
                    per_pass[p][0]["torch bsr"] = torch_fns[p]
                else:
                    per_pass[p][1]["torch bsr"] = "torch has no BSR sampled dW on this device"
            for name in backends:
                label = f"block_sparse_linear[{name}]"
                reason = _reason(name, device)
                if reason is not None:
                    for p in passes:
                        per_pass[p][1][label] = reason
                    continue
                be = get_backend(name)
                fns = {"fwd": lambda be=be: be.bsl_forward(x, w, None, L.row_ptr, L.row_cols, b, b),
                       "dX": lambda be=be: be.bsl_grad_input(dy, w, L.col_ptr, L.col_rows, b, b),
                       "dW": lambda be=be: be.bsl_grad_weight(dy, x, L.block_rows, L.block_cols, L.nnz, b, b)}
                for p in passes:
                    per_pass[p][0][label] = fns[p]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for p in passes:
                    run_group("block_sparse_linear", sparsity, b, p, per_pass[p][0], ref[p], per_pass[p][1])
        # -- unstructured: torch CSR and masked_linear ----------------------------------------------
        emask = random_element_mask(n, k, sparsity, gen).to(device)
        wm_e = w * emask
        ref = {"fwd": lambda: F.linear(x, wm_e), "dX": lambda: dy @ wm_e, "dW": lambda: (dy.t() @ x) * emask}
        w_csr, wt_csr = wm_e.to_sparse_csr(), wm_e.t().contiguous().to_sparse_csr()
        mask_csr = emask.to(w.dtype).to_sparse_csr()
        csr_fns = {"fwd": lambda: torch.sparse.mm(w_csr, xt).t(), "dX": lambda: torch.sparse.mm(wt_csr, dyt).t(),
                   "dW": lambda: torch.sparse.sampled_addmm(mask_csr, dyt, x, beta=0.0).to_dense()}
        # the op's backward is the same code for every backend (dense GEMMs on W*M, masked dW)
        op_bwd = {"dX": lambda: dy @ wm_e, "dW": lambda: (dy.t() @ x) * emask}
        for p in passes:
            providers, unavailable = {"torch csr": csr_fns[p]}, {}
            if p == "fwd":
                for name in backends:
                    label = f"masked_linear[{name}]"
                    reason = _reason(name, device)
                    if reason is not None:
                        unavailable[label] = reason
                        continue
                    be = get_backend(name)
                    providers[label] = lambda be=be: be.masked_linear_forward(x, wm_e, None)
            else:
                providers["masked_linear (all backends)"] = op_bwd[p]
            run_group("masked_linear", sparsity, "elem", p, providers, ref[p], unavailable)
    return rows


def _t(t: dict) -> dict:
    return dict(median_ms=t["median_ms"], min_ms=t["min_ms"], max_ms=t["max_ms"], reps=t["reps"],
                times_ms=t["times_ms"])


def plot(report: H.Report, output_dir):
    pyplot = H.plt()
    rows = [r for r in report.ok_rows() if r.get("op") in ("block_sparse_linear", "masked_linear")
            and r["provider"] != "dense F.linear"]
    key_of = {}
    for r in rows:
        key = r["provider"] if r["block"] in ("elem", "-") else f"{r['provider']} b{r['block']}"
        key_of[id(r)] = key
    keys = list(dict.fromkeys(key_of.values()))
    colors = {k: pyplot.cm.tab10(i % 10) for i, k in enumerate(keys)}
    metric = "speedup_min" if any(r.get("speedup_min") for r in rows) else "speedup"
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    passes = list(dict.fromkeys(r["pass_"] for r in rows))
    fig, axes = pyplot.subplots(len(shapes), len(passes), figsize=(4 * len(passes), 2.8 * len(shapes) + 0.8),
                                squeeze=False)
    for i, s in enumerate(shapes):
        for j, p in enumerate(passes):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == s and r["pass_"] == p]
            for key in keys:
                pts = sorted((r["sparsity"], r[metric]) for r in sel if key_of[id(r)] == key and r.get(metric))
                if pts:
                    ax.plot([100 * a for a, _ in pts], [v for _, v in pts], marker="o", ms=3, color=colors[key],
                            label=key)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{s} {p}", fontsize=9)
            ax.set_xlabel("sparsity %", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{metric} vs dense", fontsize=8)
    handles = [pyplot.Line2D([], [], color=colors[k], marker="o", ms=3, label=k) for k in keys]
    fig.legend(handles=handles, loc="upper center", ncol=min(4, len(keys)), fontsize=7)
    return H.save_figure(fig, report, output_dir, top=1 - 0.6 / fig.get_figheight())


COLUMNS = ["shape", "T", "op", "sparsity", "block", "pass_", "provider", "median_ms", "min_ms", "max_ms", "speedup",
           "speedup_min", "speedup_cpu",
           "max_abs_err", "status"]


def main(argv=None):
    parser = H.base_parser(__doc__.split("\n")[0], reps=5)
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=None)
    parser.add_argument("--tokens", type=int, default=None, help="tokens T = batch x length (default 4096; 512 quick)")
    parser.add_argument("--sparsities", type=float, nargs="*", default=None)
    parser.add_argument("--blocks", type=int, nargs="*", default=None, help="block sizes (default 32 64; 32 quick)")
    parser.add_argument("--no-contrastive", action="store_true", help="skip the cap_contrastive_loss rows")
    args = parser.parse_args(argv)
    H.setup(args.threads)
    device = H.resolve_device(args)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else tuple(SHAPES))
    t = args.tokens or (512 if args.quick else 4096)
    sparsities = args.sparsities if args.sparsities is not None else (QUICK_SPARSITIES if args.quick else
                                                                      FULL_SPARSITIES)
    blocks = args.blocks or ([32] if args.quick else [32, 64])
    reps = args.reps or (5 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    report = H.Report("kernels", args, device)
    for s in shapes:
        print(f"[kernels] {s} ...", flush=True)
        report.extend(shape_rows(s, t, sparsities, blocks, device, warmup, reps))
    if not args.no_contrastive:
        for row in bench_contrastive.case_rows(32, 768, device, warmup, reps):
            row.update(shape="cap_loss B32 D768", T=row["K"], pass_="fwd+bwd", sparsity=None, block="-")
            report.rows.append(row)
    report.note("speedup = dense median / provider median for the same shape and pass, measured in this run")
    report.note("masks are uniform random (exactly round(density * blocks) kept blocks)")
    H.finish(report, args, plot, COLUMNS)
    return report


if __name__ == "__main__":
    main()
