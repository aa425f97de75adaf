"""Per-phase profile of one CAP step (``bench_train_step``'s capsparse step, block 32): where the time goes.

Phases, timed with ``time.perf_counter`` inside each step (steps of the variants interleaved):
bank sampling (keys for the three banks), forward (student), CAP losses (CE + KD + contrastive
forward), backward (all of it, score gradient included), of which the score gradient
(``MovementScoreFunction.backward``, timed by a wrapper), optimizer (AdamW step), mask update
(``pruner.update``). Variants: the block-score modes ``exact`` and ``sampled`` (kept blocks exact,
pruned blocks from 1/8 of the tokens) with the fast dropout that ``sparsify`` swaps in and with torch's
(``--torch-dropout-too``), a plain HF dense fine-tuning step (the target's baseline) and the same dense step
with the fast dropout and attention (so that what sparsity itself gains is visible).

``--ops`` adds one profiled step per variant (``torch.profiler``) and reports the operators' self CPU time
(rows with ``phase = "op: <name>"``), so the time outside the linears is visible by operator.

    python benchmarks/profile_cap_step.py            # default model, batch 32, length 128, 90%
    python benchmarks/profile_cap_step.py --quick    # tiny model, batch 4, length 16
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import bench_train_step as T  # noqa: E402

PHASES = ("bank sampling", "forward", "CAP losses", "backward", "score gradient (in backward)", "optimizer",
          "mask update")


class Clock:
    def __init__(self):
        self.acc = {}

    @contextlib.contextmanager
    def phase(self, name):
        t0 = time.perf_counter()
        yield
        self.acc[name] = self.acc.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def timed_score_backward(clock: Clock):
    """Wraps ``MovementScoreFunction.backward`` so its time is added to the clock."""
    from capsparse.pruning import score_grad
    fn = score_grad.MovementScoreFunction
    original = fn.backward

    def backward(ctx, grad_out):
        with clock.phase("score gradient (in backward)"):
            return original(ctx, grad_out)
    return fn, original, staticmethod(backward)


def phased_run(step: "T.Step", clock: Clock):
    """``Step.run`` with a clock around each phase (same work, same order)."""
    from capsparse.ops import cap_contrastive_loss
    b = step.batches[step.i % len(step.batches)]
    step.i += 1
    step.opt.zero_grad(set_to_none=True)
    with clock.phase("forward"):
        logits, query = T.forward_cls(step.model, b["input_ids"], b["attention_mask"])
    with clock.phase("CAP losses"):
        loss = F.cross_entropy(logits, b["labels"])
    if step.variant != "dense fine-tune":
        with clock.phase("CAP losses"):
            loss = T.W_CE * loss + T.W_KD * T.kd(logits, step.banks.teacher_logits[b["ids"]])
        for name in T.BANKS:
            with clock.phase("bank sampling"):
                keys, kid, klab, ex = step.banks.keys_for(name, query, b["ids"], b["labels"], step.n_extra)
            with clock.phase("CAP losses"):
                lu, ls = cap_contrastive_loss(query, keys, b["ids"], kid, b["labels"], klab, temperature=T.TAU,
                                              normalization="official", exclude_index=ex)
                loss = loss + T.W_U * lu + T.W_S * ls
    with clock.phase("backward"):
        loss.backward()
    with clock.phase("optimizer"):
        step.opt.step()
    if step.pruner is not None:
        with clock.phase("mask update"):
            step.pruner.update(step.density)


def op_rows(report, steps, top: int, common: dict) -> None:
    """One ``torch.profiler`` step per variant: the ``top`` operators by self CPU time, with their share."""
    from torch.profiler import ProfilerActivity, profile
    for name, s in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s.run()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        for e in events[:top]:
            report.add(variant=name, phase=f"op: {e.key}", median_ms=e.self_cpu_time_total / 1e3,
                       share=e.self_cpu_time_total / total if total else None, calls=e.count, reps=1, **common)


def main(argv=None):
    parser = H.base_parser(__doc__.split("\n")[0], reps=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--torch-dropout-too", action="store_true",
                        help="also time the CAP variants with torch's dropout (the step before the fast dropout)")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="report the N operators with the most self CPU time of one profiled step per variant")
    args = parser.parse_args(argv)
    H.setup(args.threads)
    from capsparse.backends import cpu
    allocator = cpu.configure_allocator()
    model_name, batch, length = ("tiny", 4, 16) if args.quick else ("small", 32, 128)
    reps = args.reps or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    base = T.build_model(model_name)
    common = dict(n_examples=4096, vocab=base.config.vocab_size, n_extra=4096)
    steps = {}
    for mode in ("exact", "sampled"):
        steps[f"CAP block32, {mode} scores"] = T.Step("capsparse block32", base, args.sparsity, batch, length,
                                                      block_score_mode=mode, **common)
        if args.torch_dropout_too:
            steps[f"CAP block32, {mode} scores, torch dropout"] = T.Step(
                "capsparse block32", base, args.sparsity, batch, length, block_score_mode=mode, fast_dropout=False,
                **common)
    steps["dense fine-tune"] = T.Step("dense fine-tune", base, args.sparsity, batch, length,
                                      block_score_mode="exact", **common)
    steps["dense fine-tune, fast dropout"] = T.Step("dense fine-tune", base, args.sparsity, batch, length,
                                                    block_score_mode="exact", fast_dropout=True, **common)
    clocks = {name: [] for name in steps}
    fn, original, wrapped = None, None, None
    report = H.Report("cap_step_profile", args, "cpu")
    report.meta["allocator"] = allocator
    try:
        for i in range(warmup + reps):
            for name, s in steps.items():
                clock = Clock()
                fn, original, wrapped = timed_score_backward(clock)
                fn.backward = wrapped
                t0 = time.perf_counter()
                phased_run(s, clock)
                clock.acc["step total"] = (time.perf_counter() - t0) * 1e3
                fn.backward = staticmethod(original)
                if i >= warmup:
                    clocks[name].append(clock.acc)
    finally:
        if fn is not None:
            fn.backward = staticmethod(original)
    dense_total = statistics.median(c["step total"] for c in clocks["dense fine-tune"])
    for name, cs in clocks.items():
        total = statistics.median(c["step total"] for c in cs)
        for phase in PHASES + ("step total",):
            ms = statistics.median(c.get(phase, 0.0) for c in cs)
            report.add(variant=name, phase=phase, median_ms=ms, share=ms / total if total else None,
                       vs_dense_step=ms / dense_total if dense_total else None, reps=len(cs), model=model_name,
                       batch=batch, length=length, sparsity=args.sparsity)
    if args.ops:
        op_rows(report, steps, args.ops, dict(model=model_name, batch=batch, length=length, sparsity=args.sparsity))
    report.note("share = phase median / step-total median of the variant; vs_dense_step = phase / dense step median; "
                "the score gradient runs inside backward (its time is part of 'backward')")
    H.finish(report, args, None, ["variant", "phase", "median_ms", "share", "vs_dense_step", "status"])
    return report


if __name__ == "__main__":
    main()
