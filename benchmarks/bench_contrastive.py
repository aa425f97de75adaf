"""CAP contrastive loss: ``capsparse.ops.cap_contrastive_loss`` per backend vs a naive PyTorch loss.

The naive loss is written the way the official CAP code does it (``docs/cap.md``,
"The method as implemented"): a Python-built per-row self-exclusion mask, float ``B x K`` id and label
masks, ``-1e6`` on the excluded logit, and the "official" normalisation (positives counted as the
non-zero masked log-probabilities). Every row times forward + backward of ``w_u * L_u + w_s * L_s``
with respect to the query, and reports the speedup against that naive loss measured in the same run.

Key set per bank as in CAP: the batch's detached queries (B), their bank vectors (B) and 4096 extras,
so ``K = 4096 + 2B`` (4160 at B = 32).

    python benchmarks/bench_contrastive.py --quick     # B in {32, 64}, D in {384, 768}
    python benchmarks/bench_contrastive.py             # full: B in {16, ..., 256}, D in {384, 768}
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

from capsparse.backends.registry import BACKENDS  # noqa: E402

W_U, W_S, TAU = 0.1, 10.0, 0.1


def naive_cap_loss(q, k, query_ids, key_ids, query_labels, key_labels, self_index, tau: float = TAU):
    """Official-style CAP loss with ``B x K`` float masks (``L_u``, ``L_s``), differentiable in ``q``."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    b, n_keys = q.shape[0], k.shape[0]
    logits = q @ k.t() / tau
    # the official code builds the self mask row by row in Python
    self_mask = torch.stack([F.one_hot(torch.tensor(int(j)), n_keys).float() for j in self_index.tolist()])
    logits = logits - 1e6 * self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    not_self = 1.0 - self_mask

    def one(mask):
        mask = mask * not_self
        masked = mask * log_prob
        per_row = masked.sum(1) / mask.sum(1).clamp(min=1)
        return -per_row.sum() / (masked != 0).sum().clamp(min=1)

    id_mask = (query_ids[:, None] == key_ids[None, :]).float()
    loss_u = one(id_mask)
    loss_s = None
    if query_labels is not None:
        loss_s = one((query_labels[:, None] == key_labels[None, :]).float())
    return loss_u, loss_s


def make_inputs(b: int, d: int, extras: int = 4096, n_examples: int = 100_000, classes: int = 2,
                device: str = "cpu", seed: int = 0) -> dict:
    """Query and CAP-style key set: detached batch queries, their bank vectors, ``extras`` sampled examples."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_examples, generator=g)[: b + extras]
    batch_ids, extra_ids = ids[:b], ids[b:]
    labels_of = torch.randint(0, classes, (n_examples,), generator=g)
    query = torch.randn(b, d, generator=g)
    bank_vectors = torch.randn(b + extras, d, generator=g)
    keys = torch.cat([query.detach(), bank_vectors])
    key_ids = torch.cat([batch_ids, batch_ids, extra_ids])
    out = dict(query=query, keys=keys, query_ids=batch_ids, key_ids=key_ids, query_labels=labels_of[batch_ids],
               key_labels=labels_of[key_ids], exclude_index=torch.arange(b))
    return {k: v.to(device) for k, v in out.items()}


def _backend_reason(name: str, device: str) -> Optional[str]:
    """``None`` when backend ``name`` can run on ``device``, else why not."""
    if name in ("triton", "cuda") and not device.startswith("cuda"):
        return "no GPU"
    if name == "cpu" and device.startswith("cuda"):
        return "CPU backend, GPU run"
    from capsparse.backends.registry import backend_status
    ok, reason = backend_status(name)
    return None if ok else reason


def case_rows(b: int, d: int, device: str, warmup: int, reps: int, extras: int = 4096,
              backends=BACKENDS) -> list:
    """Rows for one (B, D): naive baseline, ``auto`` dispatch, then every backend forced."""
    from capsparse.ops import cap_contrastive_loss

    x = make_inputs(b, d, extras=extras, device=device)
    n_keys = x["keys"].shape[0]
    base = dict(op="cap_contrastive_loss", B=b, D=d, K=n_keys)

    def naive():
        q = x["query"].detach().requires_grad_(True)
        lu, ls = naive_cap_loss(q, x["keys"], x["query_ids"], x["key_ids"], x["query_labels"], x["key_labels"],
                                x["exclude_index"])
        (W_U * lu + W_S * ls).backward()
        return lu.detach(), ls.detach(), q.grad

    ref_u, ref_s, ref_g = naive()
    naive_label = "naive torch (B x K masks)"
    fns, errors, rows_na = {naive_label: naive}, {naive_label: 0.0}, []

    def run_ours(backend):
        def fn():
            q = x["query"].detach().requires_grad_(True)
            lu, ls = cap_contrastive_loss(q, x["keys"], x["query_ids"], x["key_ids"], x["query_labels"],
                                          x["key_labels"], temperature=TAU, normalization="official",
                                          exclude_index=x["exclude_index"], backend=backend)
            (W_U * lu + W_S * ls).backward()
            return lu.detach(), ls.detach(), q.grad
        return fn

    providers = [("capsparse auto", None)] + [(f"capsparse {n}", n) for n in backends]
    for label, backend in providers:
        reason = None if backend is None else _backend_reason(backend, device)
        if reason is not None:
            rows_na.append(dict(base, provider=label, status=H.not_available(reason)))
            continue
        fn = run_ours(backend)
        try:
            lu, ls, g = fn()
        except Exception as exc:  # noqa: BLE001 - a failing backend becomes a row, not a crash
            rows_na.append(dict(base, provider=label, status=H.not_available(f"{type(exc).__name__}: {exc}")))
            continue
        errors[label] = max(float((lu - ref_u).abs()), float((ls - ref_s).abs()), float((g - ref_g).abs().max()))
        fns[label] = fn
    res = H.measure_interleaved(fns, warmup, reps, device)
    t_naive = res[naive_label]
    rows = []
    for label, t in res.items():
        if "error" in t:
            rows.append(dict(base, provider=label, status=H.not_available(t["error"])))
            continue
        rows.append(dict(base, provider=label, **_t(t), speedup=H.ratio(t_naive["median_ms"], t["median_ms"]),
                         speedup_min=H.ratio(t_naive["min_ms"], t["min_ms"]), cpu_ms=t["cpu_ms"],
                         speedup_cpu=H.ratio(t_naive["cpu_ms"], t["cpu_ms"]), max_abs_err=errors[label]))
    return rows + rows_na


def _t(t: dict) -> dict:
    return dict(median_ms=t["median_ms"], min_ms=t["min_ms"], max_ms=t["max_ms"], reps=t["reps"],
                times_ms=t["times_ms"])


def plot(report: H.Report, output_dir):
    pyplot = H.plt()
    rows = report.ok_rows()
    cases = sorted({(r["B"], r["D"]) for r in rows})
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows)]
    fig, ax = pyplot.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        ys = [next((r["speedup"] for r in rows if r["provider"] == p and (r["B"], r["D"]) == c), 0) or 0
              for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"B={b}\nD={d}" for b, d in cases])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speedup vs naive B x K loss (fwd+bwd)")
    ax.set_title("CAP contrastive loss, K = 4096 + 2B keys")
    ax.legend(fontsize=7)
    return H.save_figure(fig, report, output_dir)


COLUMNS = ["B", "D", "K", "provider", "median_ms", "min_ms", "max_ms", "speedup", "speedup_min", "speedup_cpu",
           "max_abs_err",
           "status"]


def main(argv=None):
    parser = H.base_parser(__doc__.split("\n")[0], reps=7)
    parser.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes B")
    parser.add_argument("--dims", type=int, nargs="*", default=None, help="representation sizes D")
    parser.add_argument("--extras", type=int, default=4096, help="extra keys per bank (default 4096)")
    args = parser.parse_args(argv)
    H.setup(args.threads)
    device = H.resolve_device(args)
    batches = args.batch or ([32, 64] if args.quick else [16, 32, 64, 128, 256])
    dims = args.dims or [384, 768]
    reps = args.reps or (5 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1
    report = H.Report("contrastive", args, device)
    for d in dims:
        for b in batches:
            report.extend(case_rows(b, d, device, warmup, reps, extras=args.extras))
    report.note("fwd+bwd of 0.1*L_u + 10*L_s w.r.t. the query; speedup = naive median / provider median (same run)")
    report.note("'capsparse auto' is what the layers use (backend chosen by capsparse.backends.registry)")
    H.finish(report, args, plot, COLUMNS)
    return report


if __name__ == "__main__":
    main()
