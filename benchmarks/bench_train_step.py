"""The headline benchmark: one full CAP training step, capsparse vs an official-style step vs dense
fine-tuning, at 0 / 50 / 90 / 97% sparsity.

Variants (every step: student forward + backward, optimizer step; CAP variants add CE + KD + the
contrastive terms of three banks, PrC / FiC / SnC with R = 1 and 4096 extra keys each, and a mask update):

* ``capsparse block32``: ``capsparse.sparsify(model, block_size=32)``; block-sparse layers; movement
  scores per block (``capsparse.pruning``), masks recomputed with ``kthvalue`` top-k every step;
  pre-allocated banks (``capsparse.cap.banks.BankSet``) with on-device sampling and index gathers;
  cached teacher logits (the teacher is frozen in eval mode, see docs/cap.md), so no teacher
  forward; ``capsparse.ops.cap_contrastive_loss`` (no ``B x K`` masks).
* ``capsparse unstructured``: the same with element masks (``masked_linear``, ``W * M`` cached).
* ``official-style``: written here to behave like the original code (docs/cap.md, differences table): every
  encoder linear holds a score matrix, and **every forward** runs a full ``torch.sort`` of all scores
  (TopKBinarizer), rebuilds the dense ``W * M`` and multiplies densely; the teacher runs a forward every
  step; keys are gathered from fp32 CPU banks with ``numpy.random.choice`` extras and copied (the
  host-to-device copy; a ``clone`` on CPU); per-row self masks are built in Python and the loss uses float
  ``B x K`` masks (``bench_contrastive.naive_cap_loss``).
* ``dense fine-tune``: plain fine-tuning (CE only), the cost floor.

Speedups are against the official-style step at the same sparsity, measured in the same run (steps
of the variants are interleaved round-robin). Memory: ``state_mb`` is the bytes of everything resident
(parameters, gradients, optimizer moments, scores, teacher, banks, cached logits; counted from the tensors);
``step_peak_mb`` is the peak above the pre-step level during one step (``_harness.PeakMemory``: CUDA
``max_memory_allocated`` or CPU peak RSS).

    python benchmarks/bench_train_step.py --quick   # small model b8/len32 at 0%, 90% (add --models small bert-base for BERT-base b8/len32 at 90%)
    python benchmarks/bench_train_step.py           # full: small model b32/len128 at 0/50/90/97%
    python benchmarks/bench_train_step.py --models bert-base   # full BERT-base (~25 s per dense step on 2 cores)
"""
from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_contrastive import naive_cap_loss  # noqa: E402

VARIANTS = ("capsparse block32", "capsparse unstructured", "official-style", "dense fine-tune")
BANKS = ("prc", "fic", "snc")
W_CE, W_KD, KD_T, W_U, W_S, TAU = 0.1, 0.9, 2.0, 0.1, 10.0, 0.1


# -- models --------------------------------------------------------------------------------------
def build_model(name: str) -> nn.Module:
    """``small``: the default 6-layer 384-wide model (pre-trained weights); ``bert-base``: random BERT-base."""
    import transformers
    transformers.logging.set_verbosity_error()
    if name == "small":
        from capsparse.models import load_default
        model, _ = load_default(num_labels=2)
    elif name == "bert-base":
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
    elif name == "tiny":  # tests only
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=64, num_labels=2))
    else:
        raise ValueError(f"model: expected small, bert-base or tiny, got {name!r}")
    model.train()
    return model


def forward_cls(model, input_ids, attention_mask):
    """``(logits, query)``: the CAP query is the pooler output after the classifier dropout (section 2.1)."""
    out = model.bert(input_ids=input_ids, attention_mask=attention_mask)
    pooled = model.dropout(out.pooler_output)
    return model.classifier(pooled), pooled


def tensor_bytes(*objs) -> int:
    """Bytes of all distinct tensors in modules / optimizers / tensors / containers (storage counted once)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen and t.untyped_storage().data_ptr() != 0:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    def walk(o):
        if isinstance(o, torch.Tensor):
            add(o)
            if o.grad is not None:
                add(o.grad)
        elif isinstance(o, nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                walk(t)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                walk(list(state.values()))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dict__"):
            walk(vars(o))
    for o in objs:
        walk(o)
    return total


def make_pruner(model, block_score_mode: str):
    from capsparse.pruning.pruners import MovementPruner

    pruner = MovementPruner(model, block_score_mode=block_score_mode)  # checks the mode
    with torch.no_grad():
        for p in pruner.score_parameters():
            p.normal_()
    return pruner, "capsparse.pruning.pruners.MovementPruner"


def make_banks(n, dim, labels):
    from capsparse.cap.banks import BankSet

    vecs = {name: torch.randn(n, dim) for name in BANKS}
    banks = BankSet(n, dim, {name: 1 for name in BANKS}, labels=labels, seed=0)
    ids = torch.arange(n)
    for name in BANKS:
        bank = banks[name]
        bank.write(bank.new_slot(), ids, vecs[name])
    banks.teacher_logits = torch.randn(n, 2)
    return banks, "capsparse.cap.banks.BankSet"


def kd(student_logits, teacher_logits):
    from capsparse.cap.losses import kd_loss

    return kd_loss(student_logits, teacher_logits, KD_T)


# -- official-style pieces ------------------------------------------------------------------------
class TopKBinarizer(torch.autograd.Function):
    """The official ``TopKBinarizer``: a full sort of the scores on every call; straight-through backward."""

    @staticmethod
    def forward(ctx, scores, density: float):
        mask = scores.clone()
        _, idx = scores.flatten().sort(descending=True)
        j = int(density * scores.numel())
        flat = mask.view(-1)
        flat[idx[j:]] = 0.0
        flat[idx[:j]] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class OfficialMaskedLinear(nn.Module):
    """``emmental.MaskedLinear`` behaviour: scores, a mask rebuilt by a full sort and a dense ``W * M`` per forward."""

    def __init__(self, linear: nn.Linear, density_ref: list):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.mask_scores = nn.Parameter(torch.randn_like(linear.weight))
        self.density_ref = density_ref

    def forward(self, x):
        mask = TopKBinarizer.apply(self.mask_scores, self.density_ref[0])
        return F.linear(x, self.weight * mask, self.bias)


def make_official(model: nn.Module, density: float) -> list:
    from capsparse.surgery import find_targets
    ref = [density]
    for name in find_targets(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, OfficialMaskedLinear(getattr(parent, child), ref))
    return ref


class OfficialBanks:
    """fp32 CPU banks ``[N, 1, D]`` indexed by example id, keys built per step as the original code does."""

    def __init__(self, n, dim, labels):
        self.data = {name: F.normalize(torch.randn(n, 1, dim), dim=-1) for name in BANKS}
        self.labels = labels
        self.rng = np.random.default_rng(0)
        self.n = n

    def keys_for(self, name, query, ids, labels, n_extra):
        extra = torch.from_numpy(self.rng.choice(self.n, n_extra, replace=False))  # O(N) per bank per step
        bank = self.data[name]
        batch_vecs = bank[ids].reshape(-1, bank.shape[-1]).clone()    # gather + "host-to-device" copy
        extra_vecs = bank[extra].reshape(-1, bank.shape[-1]).clone()
        keys = torch.cat([query.detach(), batch_vecs, extra_vecs])
        key_ids = torch.cat([ids, ids, extra])
        key_labels = torch.cat([labels, labels, self.labels[extra]])
        return keys, key_ids, key_labels, torch.arange(query.shape[0])


# -- steps -----------------------------------------------------------------------------------------
class Step:
    """One variant: ``run()`` is one full training step."""

    def __init__(self, variant: str, base: nn.Module, sparsity: float, batch: int, length: int, n_examples: int,
                 vocab: int, block_score_mode: str, n_extra: int, fast_dropout: Optional[bool] = None):
        """``fast_dropout``: ``None`` as the library does (``sparsify`` swaps in the seed-determined dropout and
        attention, the HF variants keep torch's), ``True`` / ``False`` forces it on / off."""
        from capsparse import sparsify
        from capsparse.surgery import fast_dropout as swap_dropout
        self.variant, self.sparsity = variant, sparsity
        self.notes: List[str] = []
        self.components = ""
        density = 1.0 - sparsity
        g = torch.Generator().manual_seed(1)
        self.labels_all = torch.randint(0, 2, (n_examples,), generator=g)
        self.batches = []
        for _ in range(4):
            ids = torch.randperm(n_examples, generator=g)[:batch]
            self.batches.append(dict(input_ids=torch.randint(0, vocab, (batch, length), generator=g),
                                     attention_mask=torch.ones(batch, length, dtype=torch.long), ids=ids,
                                     labels=self.labels_all[ids]))
        self.i = 0
        self.n_extra = n_extra
        self.model = copy.deepcopy(base)
        self.model.train()
        self.teacher = self.banks = self.pruner = None
        extra_params = []
        if variant != "dense fine-tune":  # CAPTrainer's default and the official masked BERT: embeddings fixed
            from capsparse.pruning.embeddings import freeze_embeddings
            freeze_embeddings(self.model)
        if variant.startswith("capsparse"):
            sparsify(self.model, block_size=32 if "block" in variant else None, dropout=fast_dropout is not False)
            self.pruner, psrc = make_pruner(self.model, block_score_mode)
            self.pruner.update(density)
            self.banks, bsrc = make_banks(n_examples, self.model.config.hidden_size, self.labels_all)
            extra_params = self.pruner.score_parameters()
            self.components = f"{psrc}; {bsrc}; capsparse.ops.cap_contrastive_loss; cached teacher logits"
            self.density = density
        elif variant == "official-style":
            self.teacher = copy.deepcopy(base).eval()
            make_official(self.model, density)
            self.banks = OfficialBanks(n_examples, self.model.config.hidden_size, self.labels_all)
            self.components = "benchmark OfficialMaskedLinear (full sort per forward) + teacher forward + naive loss"
        elif variant == "dense fine-tune":
            self.components = "HF model, CE only"
        else:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if fast_dropout and not variant.startswith("capsparse"):
            swap_dropout(self.model)
        params = [p for n, p in self.model.named_parameters()
                  if p.requires_grad and "mask_scores" not in n and "movement_scores" not in n]
        scores = [p for n, p in self.model.named_parameters() if "mask_scores" in n] + list(extra_params)
        groups = [{"params": params, "lr": 3e-5}]
        if scores:
            groups.append({"params": scores, "lr": 1e-2})
        self.opt = torch.optim.AdamW(groups)

    def run(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        logits, query = forward_cls(self.model, b["input_ids"], b["attention_mask"])
        loss = F.cross_entropy(logits, b["labels"])
        if self.variant != "dense fine-tune":
            loss = W_CE * loss
            if self.variant == "official-style":
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = loss + W_KD * kd(logits, t_logits)
                for name in BANKS:
                    keys, kid, klab, ex = self.banks.keys_for(name, query, b["ids"], b["labels"], self.n_extra)
                    lu, ls = naive_cap_loss(query, keys, b["ids"], kid, b["labels"], klab, ex, TAU)
                    loss = loss + W_U * lu + W_S * ls
            else:
                from capsparse.ops import cap_contrastive_loss
                t_logits = self.banks.teacher_logits[b["ids"]]
                loss = loss + W_KD * kd(logits, t_logits)
                for name in BANKS:
                    keys, kid, klab, ex = self.banks.keys_for(name, query, b["ids"], b["labels"], self.n_extra)
                    lu, ls = cap_contrastive_loss(query, keys, b["ids"], kid, b["labels"], klab, temperature=TAU,
                                                  normalization="official", exclude_index=ex)
                    loss = loss + W_U * lu + W_S * ls
        loss.backward()
        self.opt.step()
        if self.pruner is not None:
            self.pruner.update(self.density)
        return float(loss.detach())

    def state_bytes(self) -> int:
        return tensor_bytes(self.model, self.opt, self.teacher, getattr(self.banks, "banks", None),
                            getattr(self.banks, "data", None), getattr(self.banks, "teacher_logits", None),
                            getattr(self.pruner, "scores", None))

    def close(self):
        if self.pruner is not None and hasattr(self.pruner, "remove"):
            try:
                self.pruner.remove()
            except Exception:  # noqa: BLE001
                pass


def _memory_and_state(s: "Step", device: str, memory: bool):
    peak, method = None, "skipped (--no-memory or quick BERT-base)"
    if memory:
        gc.collect()
        with H.PeakMemory(device) as pm:
            s.run()
        peak, method = pm.peak_mb, pm.method
    return s.state_bytes() / 2 ** 20, peak, method, s.components, "; ".join(s.notes)


def group_rows(model_name: str, base: nn.Module, sparsity: float, batch: int, length: int, args, device: str,
               warmup: int, reps: int, variants=VARIANTS, memory: bool = True, sequential: bool = False) -> List[dict]:
    """Builds every variant at ``sparsity``, times them interleaved (or one at a time with ``sequential``),
    then measures memory one by one."""
    common = dict(model=model_name, batch=batch, length=length, sparsity=sparsity)
    steps: Dict[str, Step] = {}
    rows = []

    def build(v):
        try:
            return Step(v, base, sparsity, batch, length, args.n_examples, base.config.vocab_size,
                        args.block_score_mode, args.extra_keys)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(common, variant=v, status=H.not_available(f"{type(exc).__name__}: {exc}")))
            return None

    res, meta = {}, {}
    if sequential:
        # one variant resident at a time (BERT-base: four students, a teacher and scores do not fit together)
        for v in variants:
            s = build(v)
            if s is None:
                continue
            res[v] = H.measure_interleaved({v: s.run}, warmup, reps, device)[v]
            if "error" not in res[v]:
                meta[v] = _memory_and_state(s, device, memory)
            s.close()
            del s
            gc.collect()
    else:
        for v in variants:
            s = build(v)
            if s is not None:
                steps[v] = s
        res = H.measure_interleaved({v: s.run for v, s in steps.items()}, warmup, reps, device)
        meta = {v: _memory_and_state(s, device, memory) for v, s in steps.items() if "error" not in res[v]}
    base_ms = res.get("official-style", {}).get("median_ms")
    dense_ms = res.get("dense fine-tune", {}).get("median_ms")
    for v in res:
        r = res[v]
        if "error" in r:
            rows.append(dict(common, variant=v, status=H.not_available(r["error"])))
            continue
        state_mb, peak, method, components, notes = meta[v]
        rows.append(dict(common, variant=v, median_ms=r["median_ms"], min_ms=r["min_ms"], max_ms=r["max_ms"],
                         reps=r["reps"], times_ms=r["times_ms"],
                         speedup_vs_official=H.ratio(base_ms, r["median_ms"]),
                         speedup_min_vs_official=H.ratio(res.get("official-style", {}).get("min_ms"), r["min_ms"]),
                         cost_vs_dense=(r["median_ms"] / dense_ms) if dense_ms else None,
                         state_mb=state_mb, step_peak_mb=peak, memory_method=method,
                         components=components, notes=notes, timing="sequential" if sequential else "interleaved"))
    for s in steps.values():
        s.close()
    steps.clear()
    gc.collect()
    return rows


def plot(report: H.Report, output_dir):
    pyplot = H.plt()
    rows = report.ok_rows()
    configs = list(dict.fromkeys((r["model"], r["batch"], r["length"]) for r in rows))
    fig, axes = pyplot.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        sel = [r for r in rows if (r["model"], r["batch"], r["length"]) == cfg]
        sps = sorted({r["sparsity"] for r in sel})
        variants = list(dict.fromkeys(r["variant"] for r in sel))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ys = [next((r["median_ms"] / 1e3 for r in sel if r["variant"] == v and r["sparsity"] == s), 0) for s in sps]
            bars = ax.bar([j + i * width for j in range(len(sps))], ys, width, label=v)
            for bar, s in zip(bars, sps):
                r = next((r for r in sel if r["variant"] == v and r["sparsity"] == s), None)
                if r and r.get("speedup_vs_official"):
                    ax.annotate(f"{r['speedup_vs_official']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sps))])
        ax.set_xticklabels([f"{100 * s:.0f}%" for s in sps])
        ax.set_xlabel("sparsity")
        ax.set_ylabel("seconds per step (median)")
        ax.set_title(f"{cfg[0]}: batch {cfg[1]}, len {cfg[2]} (labels: speedup vs official-style)", fontsize=9)
        ax.legend(fontsize=7)
    return H.save_figure(fig, report, output_dir)


COLUMNS = ["model", "batch", "length", "sparsity", "variant", "median_ms", "min_ms", "max_ms", "speedup_vs_official",
           "speedup_min_vs_official", "cost_vs_dense", "state_mb", "step_peak_mb", "status"]


def main(argv=None):
    parser = H.base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--models", nargs="*", default=None, choices=["small", "bert-base", "tiny"],
                        help="default: small; bert-base runs at batch 8 / len 32 in --quick")
    parser.add_argument("--sparsities", type=float, nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=None, help="default 32 (8 in --quick)")
    parser.add_argument("--length", type=int, default=None, help="default 128 (32 in --quick)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n-examples", type=int, default=16384, help="examples in the banks (default 16384)")
    parser.add_argument("--extra-keys", type=int, default=4096, help="extra keys per bank (default 4096)")
    parser.add_argument("--sequential", default="auto", choices=["auto", "yes", "no"],
                        help="time one variant at a time (auto: yes for bert-base, whose variants do not fit in "
                             "memory together), else interleaved")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra step that measures peak memory")
    parser.add_argument("--block-score-mode", default="exact", choices=["exact", "fast", "sampled"],
                        help="capsparse block movement-score gradient (CAPConfig default: exact)")
    args = parser.parse_args(argv)
    H.setup(args.threads)
    device = H.resolve_device(args)
    if device != "cpu":
        raise SystemExit("bench_train_step: the step is written for CPU tensors in this version; run with --device cpu")
    batch = args.batch or (8 if args.quick else 32)
    length = args.length or (32 if args.quick else 128)
    models = args.models or ["small"]  # --quick stays under ~2 min: BERT-base only when asked
    reps = args.reps or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    report = H.Report("train_step", args, device)
    for model_name in models:
        if args.sparsities is not None:
            sps = args.sparsities
        elif args.quick:
            sps = [0.9] if model_name == "bert-base" else [0.0, 0.9]
        else:
            sps = [0.0, 0.5, 0.9, 0.97]
        quick_big = args.quick and model_name == "bert-base"
        m_reps = 1 if (quick_big and args.reps is None) else reps
        base = build_model(model_name)
        for s in sps:
            print(f"[train_step] {model_name} sparsity {s} ...", flush=True)
            report.extend(group_rows(model_name, base, s, batch, length, args, device, warmup, m_reps,
                                     variants=args.variants, memory=not (args.no_memory or quick_big),
                                     sequential=args.sequential == "yes" or (args.sequential == "auto"
                                                                             and model_name == "bert-base")))
            report.write(args.output_dir)  # partial results survive an interrupted long run
        del base
        gc.collect()
    if args.quick:
        report.note(f"quick mode: batch {batch}, length {length}, {reps} reps "
                    f"(BERT-base: 1 rep, 90% only, no memory step); "
                    f"the full mode is batch 32, length 128")
    report.note("speedup_vs_official = official-style median / variant median at the same sparsity (same run; "
                "interleaved, or one variant at a time where the row says timing=sequential); "
                "cost_vs_dense = variant median / dense fine-tune median")
    report.note("state_mb: resident tensors (params, grads, AdamW moments, scores, teacher, banks, cached logits); "
                "step_peak_mb: peak above the pre-step level during one step (see memory_method)")
    comps = {r.get("components") for r in report.ok_rows() if r.get("components")}
    for c in sorted(comps):
        report.note(f"components: {c}")
    H.finish(report, args, plot, COLUMNS)
    return report


if __name__ == "__main__":
    main()
