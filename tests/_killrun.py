"""A tiny deterministic training run through the Hugging Face ``Trainer`` for the kill-and-resume tests (run as
a subprocess): a block-sparse :class:`capsparse.SparseLinear` and a head, AdamW, dropout, shuffled data, atomic
manifested ``checkpoint-N`` directories (:class:`capsparse.checkpoint.AtomicCheckpointCallback`), Ctrl-C stop
(:class:`capsparse.resources.GracefulStopCallback`) and resume from the newest valid checkpoint
(:func:`capsparse.checkpoint.resolve_resume_checkpoint`). At the end ``final/`` holds the state to compare bit
for bit (weights, masks, AdamW moments, the per-step losses).

``--kill-at EVENT:N`` sends SIGKILL to this very process at the N-th occurrence of EVENT: ``fwd`` (after a
forward), ``bwd`` (after backward, before the optimizer step), ``opt`` (after the optimizer step),
``ckpt.files`` (a checkpoint's files written, no manifest yet) or ``ckpt.before_manifest`` (inside the manifest
write, every file fsynced). ``READY`` is printed once imports are done, ``STEP n`` after each step, so that a
parent can also kill at a random wall-clock time or after a given step.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

# Bit-identical results across processes need a fixed thread count and MKL's conditional numerical
# reproducibility (its kernels may otherwise pick paths by alignment / CPU state).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from capsparse import checkpoint as ck  # noqa: E402
from capsparse.nn import SparseLinear  # noqa: E402

N, FEAT, HID, CLASSES, BATCH = 48, 32, 64, 3, 8
EVENTS = ("fwd", "bwd", "opt", "ckpt.files", "ckpt.before_manifest")

_counts: dict = {}
_kill = None


def event(name: str) -> None:
    _counts[name] = _counts.get(name, 0) + 1
    if _kill is not None and _kill[0] == name and _counts[name] == _kill[1]:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = SparseLinear(FEAT, HID, block_size=16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(HID, CLASSES)

    def forward(self, x, labels):
        logits = self.head(self.drop(F.gelu(self.fc1(x))))
        event("fwd")
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def write_final(run_dir: Path, step: int) -> None:
    """``final/state.safetensors`` (weights, masks, AdamW moments) and ``final/state.json`` (per-step losses, step),
    read from the verified ``checkpoint-<step>``: the same whether this process trained or only resumed there."""
    from safetensors.torch import load_file, save_file

    ckpt = run_dir / f"checkpoint-{step}"
    ck.verify_checkpoint(ckpt)
    tensors = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    optim = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    for pid, state in optim["state"].items():
        tensors.update({f"optim.{pid}.{k}": v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)})
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    final = run_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(final / "state.safetensors"))
    (final / "state.json").write_text(json.dumps({"step": step, "losses": [e["loss"] for e in history if "loss" in e]}))


def main(argv=None) -> int:
    global _kill
    import transformers

    from capsparse.guards import NanGuardCallback
    from capsparse.resources import GracefulStopCallback

    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--kill-at", default=None)
    args = p.parse_args(argv)
    if args.kill_at:
        name, n = args.kill_at.rsplit(":", 1)
        if name not in EVENTS:
            raise SystemExit(f"--kill-at: unknown event {name!r}; expected one of {EVENTS}")
        _kill = (name, int(n))
    ck.FAULT_HOOK = lambda e: event("ckpt." + e)
    torch.set_num_threads(1)

    class Events(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, **kw):
            event("bwd")

        def on_optimizer_step(self, a, state, control, **kw):
            event("opt")

        def on_step_end(self, a, state, control, **kw):
            print(f"STEP {state.global_step}", flush=True)
            if args.step_sleep:
                time.sleep(args.step_sleep)

        def on_save(self, a, state, control, **kw):
            event("ckpt.files")  # before AtomicCheckpointCallback (added last) writes the manifest

    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(FEAT, generator=g), "labels": torch.tensor(i % CLASSES)} for i in range(N)]
    targs = transformers.TrainingArguments(
        output_dir=args.run_dir, per_device_train_batch_size=BATCH, max_steps=args.max_steps, save_steps=4,  # 4 | 16
        save_total_limit=2, report_to="none", use_cpu=True, learning_rate=1e-2, logging_steps=1,
        disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    stop = GracefulStopCallback()
    trainer = transformers.Trainer(model=Net(), args=targs, train_dataset=data,
                                   callbacks=[Events(), NanGuardCallback("stop"), stop])
    trainer.add_callback(ck.AtomicCheckpointCallback())  # last: after every other on_save
    print("READY", flush=True)
    resume = ck.resolve_resume_checkpoint(args.run_dir)
    if resume is not None:
        print(f"RESUMED {Path(resume).name}", flush=True)
    if resume is not None and ck.checkpoint_step(resume) >= args.max_steps:
        # killed after the last checkpoint: the run is complete (transformers would train no step, then rewrite
        # checkpoint-<max_steps> with a fresh optimizer's state)
        write_final(Path(args.run_dir), args.max_steps)
        print("DONE", flush=True)
        return 0
    trainer.train(resume_from_checkpoint=resume)
    if stop.requested:
        print(f"STOPPED at {trainer.state.global_step}", flush=True)
        return 0
    write_final(Path(args.run_dir), trainer.state.global_step)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if a != "trainer"]))  # "trainer": the former name of this mode
