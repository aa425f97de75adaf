"""A tiny deterministic CAP-style training run for the kill-and-resume tests (run as a subprocess).

An MLP with two :class:`capsparse.SparseLinear` layers (one block-sparse 16x16, one element-masked) is
trained with cross-entropy + :func:`capsparse.ops.cap_contrastive_loss` against a memory bank of
``N x R_max x D`` representations (one snapshot encoded at the start of every epoch, in batches), with
movement-style scores, top-k masks on a cubic schedule, AdamW, dropout and randomly sampled bank extras.
A checkpoint (weights, masks, scores, optimizer, bank, data order, metrics, every RNG) is written every
``--ckpt-every`` steps through :mod:`capsparse.checkpoint`; on start the run resumes from the newest valid
checkpoint. At the end ``final/`` holds the state to compare bit for bit.

``--kill-at EVENT:N`` sends SIGKILL to this very process at the N-th occurrence of EVENT: ``fwd`` (after the
forward), ``bwd`` (after backward), ``opt`` (after the optimizer step), ``mask`` (after a mask update),
``encode`` (after a bank-encoding batch) or ``ckpt.file`` / ``ckpt.before_manifest`` / ``ckpt.before_rename``
/ ``ckpt.after_rename`` (inside a checkpoint write). ``READY`` is printed once imports are done, so that a
parent can also kill at a random wall-clock time.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# Bit-identical results across processes need a fixed thread count and MKL's conditional numerical
# reproducibility (its kernels may otherwise pick paths by alignment / CPU state).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from capsparse import checkpoint as ck  # noqa: E402
from capsparse.layout import topk_mask  # noqa: E402
from capsparse.nn import SparseLinear  # noqa: E402
from capsparse.ops import cap_contrastive_loss  # noqa: E402

N, FEAT, HID, DIM, CLASSES, BATCH, EXTRAS = 48, 32, 64, 32, 3, 8, 12
EVENTS = ("fwd", "bwd", "opt", "mask", "encode", "ckpt.file", "ckpt.before_manifest", "ckpt.before_rename",
          "ckpt.after_rename")

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
        self.fc1 = SparseLinear(FEAT, HID, block_size=16)
        self.fc2 = SparseLinear(HID, DIM)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        rep = torch.tanh(self.fc2(self.drop(F.gelu(self.fc1(x)))))
        return rep, self.head(self.drop(rep))


def build(seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    data_x = torch.randn(N, FEAT, generator=g)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scores = {"fc1": torch.zeros(model.fc1.block_mask.shape, dtype=torch.float32),
              "fc2": torch.zeros(model.fc2.mask.shape, dtype=torch.float32)}
    return data_x, labels, model, opt, scores


def density_at(step: int, total: int, final: float = 0.3) -> float:
    t = min(1.0, step / max(1, total - 4))
    return final + (1.0 - final) * (1.0 - t) ** 3


def main(argv=None) -> int:
    global _kill
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--mask-every", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--kill-at", default=None)
    args = p.parse_args(argv)
    if args.kill_at:
        name, n = args.kill_at.rsplit(":", 1)
        if name not in EVENTS:
            raise SystemExit(f"--kill-at: unknown event {name!r}; expected one of {EVENTS}")
        _kill = (name, int(n))
    ck.FAULT_HOOK = lambda e: event("ckpt." + e)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print("READY", flush=True)

    run_dir = Path(args.run_dir)
    steps_per_epoch = N // BATCH
    total = args.epochs * steps_per_epoch
    r_max = args.epochs
    data_x, labels, model, opt, scores = build(args.seed)
    bank = torch.zeros(N, r_max, DIM)
    g_data = torch.Generator().manual_seed(args.seed + 2)
    g_extra = torch.Generator().manual_seed(args.seed + 3)
    gens = {"data": g_data, "extra": g_extra}
    step, filled, perm, losses = 0, 0, None, []

    latest = ck.latest_valid_checkpoint(run_dir)
    if latest is not None:
        tensors, meta = ck.load_state(latest)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict(ck.unflatten_tree(meta["optim"], tensors))
        scores = {k: tensors[f"scores.{k}"].clone() for k in scores}
        bank = tensors["bank"].clone()
        perm = tensors["perm"].clone() if "perm" in tensors else None
        step, filled, losses = meta["step"], meta["filled"], meta["losses"]
        ck.restore_rng_state(tensors, meta["rng"], gens)
        print(f"RESUMED {latest.name} step {step}", flush=True)

    def save():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        opt_t, opt_skel = ck.flatten_tree(opt.state_dict(), "optim")
        tensors.update(opt_t)
        tensors.update({f"scores.{k}": v for k, v in scores.items()})
        tensors["bank"] = bank
        if perm is not None:
            tensors["perm"] = perm
        rng_t, rng_meta = ck.capture_rng_state(gens)
        tensors.update(rng_t)
        meta = {"step": step, "filled": filled, "losses": losses, "optim": opt_skel, "rng": rng_meta}
        ck.save_checkpoint(run_dir, step, tensors, meta, keep_last=args.keep_last)

    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        if pos == 0 and filled == epoch:  # snapshot bank encoding at the start of every epoch
            model.eval()
            with torch.no_grad():
                for i in range(0, N, BATCH):
                    bank[i:i + BATCH, epoch] = F.normalize(model(data_x[i:i + BATCH])[0], dim=1)
                    event("encode")
            model.train()
            filled = epoch + 1
            perm = torch.randperm(N, generator=g_data)
        ids = perm[pos * BATCH:(pos + 1) * BATCH]
        rep, logits = model(data_x[ids])
        extras = torch.randperm(N, generator=g_extra)[:EXTRAS]
        key_src = torch.cat([ids, extras])
        keys = torch.cat([rep.detach(), bank[key_src, :filled].reshape(-1, DIM)])
        key_ids = torch.cat([ids, key_src.repeat_interleave(filled)])
        exclude = torch.arange(BATCH)
        loss_u, loss_s = cap_contrastive_loss(rep, keys, ids, key_ids, labels[ids], labels[key_ids],
                                              temperature=0.1, exclude_index=exclude)
        loss = F.cross_entropy(logits, labels[ids]) + 0.5 * loss_u + 0.1 * loss_s
        event("fwd")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        event("bwd")
        with torch.no_grad():  # movement scores: -W * dL/dW (per block for the block layer)
            g1 = -(model.fc1.weight * model.fc1.weight.grad)
            scores["fc1"] += g1.reshape(HID // 16, 16, FEAT // 16, 16).sum((1, 3))
            scores["fc2"] += -(model.fc2.weight * model.fc2.weight.grad)
        opt.step()
        event("opt")
        step += 1
        losses.append(float(loss.detach()))
        if step % args.mask_every == 0:
            d = density_at(step, total)
            model.fc1.set_mask(topk_mask(scores["fc1"], d))
            model.fc2.set_mask(topk_mask(scores["fc2"], d))
            event("mask")
        if step % args.ckpt_every == 0 or step == total:
            save()

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"scores.{k}": v for k, v in scores.items()})
    tensors["bank"] = bank
    opt_t, _ = ck.flatten_tree(opt.state_dict(), "optim")
    tensors.update(opt_t)
    with ck.atomic_checkpoint_dir(run_dir / "final") as tmp:
        ck.save_state(tmp, tensors, {"losses": losses, "step": step, "filled": filled})
    print(f"DONE step {step}", flush=True)
    return 0




# ---------------------------------------------------------------------------------------------------------
# Hugging Face Trainer variant: atomic manifested checkpoint-N dirs, Ctrl-C stop, resume
# ---------------------------------------------------------------------------------------------------------


def trainer_main(argv) -> int:
    import transformers

    from capsparse.checkpoint import AtomicCheckpointCallback, resolve_resume_checkpoint
    from capsparse.guards import NanGuardCallback
    from capsparse.resources import GracefulStopCallback

    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    class TrainerNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = SparseLinear(FEAT, HID, block_size=16)
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(HID, CLASSES)

        def forward(self, x, labels):
            logits = self.head(self.drop(F.gelu(self.fc1(x))))
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Progress(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            print(f"STEP {state.global_step}", flush=True)
            if args.step_sleep:
                import time

                time.sleep(args.step_sleep)

    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(FEAT, generator=g), "labels": torch.tensor(i % CLASSES)} for i in range(N)]
    targs = transformers.TrainingArguments(
        output_dir=args.run_dir, per_device_train_batch_size=BATCH, max_steps=args.max_steps, save_steps=4,
        save_total_limit=2, report_to="none", use_cpu=True, learning_rate=1e-2, logging_strategy="no",
        disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    stop = GracefulStopCallback()
    trainer = transformers.Trainer(model=TrainerNet(), args=targs, train_dataset=data,
                                   callbacks=[Progress(), NanGuardCallback("stop"), stop])
    trainer.add_callback(AtomicCheckpointCallback())  # last: after every other on_save
    print("READY", flush=True)
    resume = resolve_resume_checkpoint(args.run_dir)
    trainer.train(resume_from_checkpoint=resume)
    if stop.requested:
        print(f"STOPPED at {trainer.state.global_step}", flush=True)
        return 0
    with ck.atomic_checkpoint_dir(Path(args.run_dir) / "final") as tmp:
        ck.save_state(tmp, dict(trainer.model.state_dict()), {"step": trainer.state.global_step})
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["trainer"]:
        sys.exit(trainer_main(sys.argv[2:]))
    sys.exit(main())
