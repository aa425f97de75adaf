"""CAP memory banks: pre-allocated ``N x R_max x D`` representation tables indexed by example id.

A bank is filled by a no-grad encoding pass that writes each batch into its rows by example id
(no per-batch ``torch.cat``, so a pass costs one copy of the data, not the official quadratic
re-concatenation). The SnC bank grows one slot per snapshot up to ``R_max`` (then the oldest slot is
overwritten). Keys for the loss follow ``docs/cap.md`` (Keys).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..distributed import process_group
from ..resources import available_gpu_memory, available_ram
from .config import BANK_DTYPES

DTYPES = {name: getattr(torch, name) for name in BANK_DTYPES}  # the names live in the config


def estimate_bank_bytes(n_examples: int, reps: Dict[str, int], dim: int, dtype: str = "float32") -> int:
    """Bytes of the banks: ``sum_b N * R_b * D * itemsize`` (labels and teacher logits are extra, small)."""
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return int(sum(n_examples * r * dim * itemsize for r in reps.values()))


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: ``mem_get_info``; CPU: available RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return available_gpu_memory(device)
    return available_ram()


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def choose_bank_device(requested: str, model_device: torch.device, needed: int, headroom: float = 0.8
                       ) -> Tuple[torch.device, bool]:
    """``(device, pin)``. "auto": the model's accelerator when ``needed`` fits in ``headroom`` of its free memory,
    else CPU (pinned when CUDA exists). A clear MemoryError is raised BEFORE any allocation if nothing fits."""
    model_device = torch.device(model_device)
    if requested != "auto":
        device = torch.device(requested)
        free = available_memory(device)
        if needed > headroom * free:
            raise MemoryError(f"banks: need {_gib(needed)} on {device} but only {_gib(free)} is free "
                              f"(using at most {headroom:.0%}); lower n_extra_keys/max_snapshots, use "
                              f"bank_dtype='bfloat16', disable a bank, or set bank_device")
        return device, device.type == "cpu" and torch.cuda.is_available()
    if model_device.type == "cuda" and needed <= headroom * available_memory(model_device):
        return model_device, False
    free = available_memory(torch.device("cpu"))
    if needed > headroom * free:
        raise MemoryError(f"banks: need {_gib(needed)} but neither the accelerator nor the host has room "
                          f"(host free {_gib(free)}, using at most {headroom:.0%}); use bank_dtype='bfloat16', "
                          f"lower max_snapshots or disable a bank")
    return torch.device("cpu"), torch.cuda.is_available()


class MemoryBank:
    """``data[N, R_max, D]`` plus the number of filled slots. Rows are example ids."""

    def __init__(self, name: str, n_examples: int, max_reps: int, dim: int, dtype=torch.float32,
                 device="cpu", pin: bool = False):
        self.name = name
        self.data = torch.zeros(n_examples, max_reps, dim, dtype=dtype, device=device)
        if pin and self.data.device.type == "cpu":
            self.data = self.data.pin_memory()
        self.count = 0       # filled slots (<= max_reps)
        self.next_slot = 0   # ring position of the next snapshot

    @property
    def max_reps(self) -> int:
        return self.data.shape[1]

    @property
    def n_examples(self) -> int:
        return self.data.shape[0]

    def new_slot(self) -> int:
        slot = self.next_slot
        self.next_slot = (self.next_slot + 1) % self.max_reps
        self.count = min(self.count + 1, self.max_reps)
        return slot

    @torch.no_grad()
    def write(self, slot: int, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        self.data[ids.to(self.data.device), slot] = F.normalize(vectors.float(), dim=-1).to(
            device=self.data.device, dtype=self.data.dtype)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """``[len(ids), count, D]`` vectors of the filled slots."""
        return self.data[ids.to(self.data.device), :self.count]

    def state_dict(self) -> dict:
        return {"data": self.data[:, :self.max_reps].cpu(), "count": self.count, "next_slot": self.next_slot}

    def load_state_dict(self, state: dict) -> None:
        self.data.copy_(state["data"].to(self.data.dtype))
        self.count, self.next_slot = int(state["count"]), int(state["next_slot"])


class BankSet:
    """The PrC / SnC / FiC banks, the training labels, the sampling generator and the teacher-logit cache."""

    def __init__(self, n_examples: int, dim: int, reps: Dict[str, int], dtype: str = "float32",
                 device="cpu", pin: bool = False, labels: Optional[torch.Tensor] = None, seed: int = 0):
        self.n_examples, self.dim = int(n_examples), int(dim)
        self.device = torch.device(device)
        self.banks = {name: MemoryBank(name, n_examples, r, dim, DTYPES[dtype], device, pin)
                      for name, r in reps.items()}
        self.labels = None if labels is None else labels.to(self.device)
        self.teacher_logits: Optional[torch.Tensor] = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    @classmethod
    def allocate(cls, n_examples: int, dim: int, reps: Dict[str, int], dtype: str = "float32",
                 requested_device: str = "auto", model_device="cpu", labels=None, seed: int = 0) -> "BankSet":
        """Estimate the memory, pick the device (raising before allocating when it cannot fit), allocate."""
        needed = estimate_bank_bytes(n_examples, reps, dim, dtype)
        device, pin = choose_bank_device(requested_device, model_device, needed)
        return cls(n_examples, dim, reps, dtype, device, pin, labels, seed)

    def __getitem__(self, name: str) -> MemoryBank:
        return self.banks[name]

    def ready(self) -> Dict[str, MemoryBank]:
        """Banks with at least one filled slot (a module drops out until its bank exists)."""
        return {n: b for n, b in self.banks.items() if b.count > 0}

    def sample_extra_ids(self, n: int) -> torch.Tensor:
        """``n`` distinct example ids, uniformly without replacement, sampled on the bank's device."""
        n = min(int(n), self.n_examples)
        return torch.randperm(self.n_examples, generator=self.generator, device=self.device)[:n]

    def keys_for(self, name: str, query: torch.Tensor, ids: torch.Tensor, labels: Optional[torch.Tensor],
                 n_extra_keys: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """``(keys, key_ids, key_labels, exclude_index)`` for bank ``name`` (``docs/cap.md``, Keys).

        Keys: the batch's detached queries (positions ``0..B-1``, so ``exclude_index[i] = i``), then the
        batch's ``R`` bank vectors each, then ``floor(n_extra_keys / R)`` random examples' ``R`` vectors.
        """
        bank = self.banks[name]
        r = bank.count
        device = query.device
        b = query.shape[0]
        m = min(n_extra_keys // r, self.n_examples) if r else 0
        extra = self.sample_extra_ids(m)
        bank_ids = torch.cat([ids.to(self.device), extra])
        vecs = bank.gather(bank_ids).reshape(-1, bank.data.shape[-1])
        vecs = vecs.to(device=device, dtype=torch.float32, non_blocking=True)
        keys = torch.cat([query.detach().float(), vecs])
        rep_ids = bank_ids.to(device).repeat_interleave(r)
        key_ids = torch.cat([ids.to(device), rep_ids])
        key_labels = None
        if labels is not None:
            bank_labels = self.labels[bank_ids].to(device).repeat_interleave(r)
            key_labels = torch.cat([labels.to(device), bank_labels])
        exclude = torch.arange(b, device=device)
        return keys, key_ids, key_labels, exclude

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"banks": {n: b.state_dict() for n, b in self.banks.items()},
                "labels": None if self.labels is None else self.labels.cpu(),
                "teacher_logits": None if self.teacher_logits is None else self.teacher_logits.cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state["banks"].items():
            self.banks[name].load_state_dict(s)
        if state.get("labels") is not None:
            self.labels = state["labels"].to(self.device)
        if state.get("teacher_logits") is not None:
            self.teacher_logits = state["teacher_logits"].to(self.device)
        self.generator.set_state(state["generator"])


# -- encoding passes ---------------------------------------------------------------------------------------
def shard_indices(n: int) -> torch.Tensor:
    """This process's contiguous slice of ``0..n-1`` (all of it without torch.distributed)."""
    dist = process_group(multi=True)
    if dist is None:
        return torch.arange(n)
    world, rank = dist.get_world_size(), dist.get_rank()
    per = (n + world - 1) // world
    return torch.arange(rank * per, min(n, (rank + 1) * per))


def all_gather_rows(ids: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(ids [n_r], rows [n_r, ...])`` from all processes (padded to the largest shard)."""
    dist = process_group(multi=True)
    if dist is None:
        return ids, rows
    world = dist.get_world_size()
    n = torch.tensor([ids.numel()], device=ids.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    biggest = int(max(s.item() for s in sizes))
    pad_ids = torch.full((biggest,), -1, dtype=ids.dtype, device=ids.device)
    pad_ids[:ids.numel()] = ids
    pad_rows = rows.new_zeros((biggest,) + tuple(rows.shape[1:]))
    pad_rows[:rows.shape[0]] = rows
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids)
    dist.all_gather(all_rows, pad_rows)
    ids_cat, rows_cat = torch.cat(all_ids), torch.cat(all_rows)
    keep = ids_cat >= 0
    return ids_cat[keep], rows_cat[keep]


@contextlib.contextmanager
def _mode(model, train: bool):
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def encode_pass(model, batches: Iterable[dict], encode_fn, train_mode: bool = False, seed: Optional[int] = None,
                n_examples: Optional[int] = None, want_logits: bool = False):
    """Run ``encode_fn(model, batch) -> (reps [B, D], logits [B, C] | None)`` over ``batches`` without grad.

    Returns ``(ids, reps, logits)`` of ALL processes (all-gathered under torch.distributed). ``seed`` forks
    the RNG (dropout in train mode) so the pass is reproducible and does not consume the training RNG.
    Results are written into preallocated ``[n_examples, ...]`` tensors by id (no per-batch cat).
    """
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), _mode(model, train_mode):
        if seed is not None:
            torch.manual_seed(int(seed))
        reps_out = logits_out = seen = None
        for batch in batches:
            ids = batch["idx"]
            reps, logits = encode_fn(model, batch)
            if reps_out is None:
                size = n_examples or 0
                reps_out = reps.new_zeros(size, reps.shape[-1], dtype=torch.float32)
                seen = torch.zeros(size, dtype=torch.bool, device=reps.device)
                if want_logits and logits is not None:
                    logits_out = reps.new_zeros((size,) + tuple(logits.shape[1:]), dtype=torch.float32)
            ids = ids.to(reps.device)
            reps_out[ids] = reps.float()
            seen[ids] = True
            if logits_out is not None:
                logits_out[ids] = logits.float()
    if reps_out is None:
        raise ValueError("encode: the training data gave no batch to encode")
    local_ids = torch.nonzero(seen).reshape(-1)
    ids, reps = all_gather_rows(local_ids, reps_out[local_ids])
    logits = None
    if logits_out is not None:
        _, logits = all_gather_rows(local_ids, logits_out[local_ids])
    return ids, reps, logits
