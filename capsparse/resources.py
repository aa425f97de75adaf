"""Resource planning before a long run, and a clean stop on Ctrl-C.

* :func:`estimate_bank_bytes`: CAP's memory banks are ``N x R x D`` per bank (PrC and FiC: ``R = 1``; SnC:
  ``R = R_max`` snapshots, pre-allocated), plus the labels/ids bank and the teacher-logit cache
  (``docs/cap-method.md`` section 7: fp32, 11 representations of MNLI's 392,702 examples at D = 768 is 13.3 GB).
* :func:`estimate_checkpoint_bytes`: one checkpoint holds weights, movement scores, the AdamW moments of both,
  masks and banks; ``keep_last + 1`` of them can exist at once (the one being written).
* :func:`check_resources`: compares the estimates with free RAM (``psutil`` if present, else
  ``/proc/meminfo`` ``MemAvailable``), free GPU memory (``torch.cuda.mem_get_info``) and free disk
  (``shutil.disk_usage``), and raises :class:`ResourceError` with suggestions (fp16 banks, CPU banks, fewer
  snapshots, fewer kept checkpoints) when something does not fit.
* :class:`GracefulStop` / :class:`GracefulStopCallback`: the first Ctrl-C (SIGINT, or SIGTERM) requests a stop
  after the current step *and a checkpoint*; a second Ctrl-C interrupts immediately.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp64": 8, "float64": 8}


class ResourceError(RuntimeError):
    """Not enough RAM, GPU memory or disk for the planned run; the message says what and how to fix it."""


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype.lower()]
    raise ValueError(f"dtype: expected a torch.dtype or one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")


def _pos_int(name, value, allow_zero=False):
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name}: expected an int >= {0 if allow_zero else 1}, got {value!r}")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


@dataclass
class MemoryEstimate:
    """Bytes per part; ``total`` is their sum."""

    parts: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def __str__(self) -> str:
        lines = [f"  {k}: {human_bytes(v)}" for k, v in self.parts.items()]
        return "\n".join([f"total {human_bytes(self.total)}", *lines])


def estimate_bank_bytes(n_examples: int, dim: int = 768, reps: Optional[Dict[str, int]] = None,
                        dtype="fp32", num_labels: int = 2, teacher_logits_per_example: Optional[int] = None,
                        extras: int = 4096, batch_size: int = 32) -> MemoryEstimate:
    """Memory of CAP's banks and caches.

    Args:
        n_examples: ``N``, training examples (SQuAD: features).
        dim: representation width ``D`` (768 for BERT-base, 384 for MiniLM).
        reps: representations per example for each bank, default ``{"prc": 1, "fic": 1, "snc": 9}`` (the
            official 10-epoch unstructured run; ``R_max`` snapshots for SnC).
        dtype: bank storage dtype (``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype).
        num_labels: classes ``C`` for the teacher-logit cache (fp32, ``N x C``).
        teacher_logits_per_example: overrides ``num_labels`` (SQuAD: ``max_seq_len * 2``).
        extras, batch_size: for the per-step gather buffer (``(B * (R + 1) + extras) x D`` per bank).
    """
    _pos_int("n_examples", n_examples)
    _pos_int("dim", dim)
    reps = {"prc": 1, "fic": 1, "snc": 9} if reps is None else reps
    if not isinstance(reps, dict) or not reps:
        raise ValueError(f"reps: expected a non-empty dict bank name -> representations per example, got {reps!r}")
    for name, r in reps.items():
        _pos_int(f"reps[{name!r}]", r)
    el = dtype_bytes(dtype)
    parts = {f"bank {name} ({n_examples} x {r} x {dim}, {el}-byte)": n_examples * r * dim * el
             for name, r in reps.items()}
    parts["ids + labels (int64)"] = n_examples * 2 * 8
    per_ex = teacher_logits_per_example if teacher_logits_per_example is not None else num_labels
    _pos_int("teacher_logits_per_example", per_ex)
    parts[f"teacher-logit cache ({n_examples} x {per_ex}, fp32)"] = n_examples * per_ex * 4
    gather = sum((batch_size * (r + 1) + extras) * dim * 4 for r in reps.values())
    parts["per-step key gather (fp32)"] = gather
    return MemoryEstimate(parts)


def estimate_checkpoint_bytes(n_params: int, n_scores: int = 0, optimizer_moments: int = 2, param_bytes: int = 4,
                              bank: Optional[MemoryEstimate] = None, n_mask_elements: int = 0,
                              keep_last: int = 2) -> MemoryEstimate:
    """Disk for the checkpoints of a run: ``keep_last + 1`` copies (the newest is written before rotation).

    One checkpoint = weights + scores (``param_bytes`` each) + ``optimizer_moments`` AdamW moments for both
    + bool masks + banks (their stored size) + small files.
    """
    _pos_int("n_params", n_params)
    _pos_int("n_scores", n_scores, allow_zero=True)
    _pos_int("keep_last", keep_last)
    one = (n_params + n_scores) * param_bytes * (1 + optimizer_moments) + n_mask_elements
    if bank is not None:
        one += sum(v for k, v in bank.parts.items() if k.startswith(("bank", "ids", "teacher")))
    one += 1 << 20
    return MemoryEstimate({f"one checkpoint": one, f"{keep_last} more kept while the next is written": one * keep_last})


def available_ram() -> int:
    """Bytes of RAM available to new allocations (psutil, else /proc/meminfo MemAvailable, else total)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_gpu_memory(device=None) -> Optional[int]:
    """Free bytes on a CUDA device, or ``None`` without CUDA (never initialises CUDA when unavailable)."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def available_disk(path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


@dataclass
class ResourceReport:
    ok: bool
    problems: List[str]
    suggestions: List[str]
    lines: List[str]

    def __str__(self) -> str:
        out = list(self.lines)
        if self.problems:
            out += ["problems:"] + [f"  - {p}" for p in self.problems]
            out += ["suggestions:"] + [f"  - {s}" for s in self.suggestions]
        return "\n".join(out)


def check_resources(bank: Optional[MemoryEstimate] = None, bank_device: Union[str, torch.device] = "cpu",
                    checkpoint: Optional[MemoryEstimate] = None, checkpoint_dir=None, model_bytes: int = 0,
                    headroom: float = 0.9, strict: bool = True, ram: Optional[int] = None,
                    gpu: Optional[int] = None, disk: Optional[int] = None) -> ResourceReport:
    """Check that the banks fit in RAM (or GPU memory) and the checkpoints on disk.

    Args:
        bank: from :func:`estimate_bank_bytes`.
        bank_device: where the banks live (``"cpu"`` or a CUDA device).
        checkpoint: from :func:`estimate_checkpoint_bytes`; checked against ``checkpoint_dir``'s file system.
        model_bytes: GPU bytes already planned for models (student + teacher + optimizer) when banks go on GPU.
        headroom: use at most this fraction of what is free.
        strict: raise :class:`ResourceError` when something does not fit (else return the report, logged).
        ram, gpu, disk: override the measured free bytes (tests, planning for another machine).
    """
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom: expected a fraction in (0, 1], got {headroom!r}")
    device = torch.device(bank_device)
    problems, suggestions, lines = [], [], []
    if bank is not None:
        need = bank.total
        if device.type == "cuda":
            free = gpu if gpu is not None else available_gpu_memory(device)
            where = f"GPU {device}"
            need += model_bytes
        else:
            free = ram if ram is not None else available_ram()
            where = "RAM"
        lines.append(f"banks: need {human_bytes(need)} on {where}, {human_bytes(free or 0)} free")
        if free is None:
            problems.append(f"banks: {where} requested but CUDA is not available")
            suggestions.append("keep the banks on the CPU (bank_device='cpu')")
        elif need > headroom * free:
            problems.append(f"banks: need {human_bytes(need)} but only {human_bytes(free)} of {where} is free "
                            f"({int(headroom * 100)}% usable)")
            if not any("2-byte" in k for k in bank.parts):
                suggestions.append("store the banks in fp16/bf16 (bank_dtype='fp16'): halves their size")
            if device.type == "cuda":
                suggestions.append("keep the banks in (pinned) CPU memory (bank_device='cpu')")
            suggestions.append("keep fewer snapshots (a smaller R_max for SnC) or turn a bank off")
            suggestions.append("train on a subset (max_examples) or a machine with more memory")
    if checkpoint is not None:
        if checkpoint_dir is None:
            raise ValueError("checkpoint_dir: expected the output directory to check the checkpoint estimate against")
        free = disk if disk is not None else available_disk(checkpoint_dir)
        lines.append(f"checkpoints: need {human_bytes(checkpoint.total)} in {checkpoint_dir}, {human_bytes(free)} free")
        if checkpoint.total > headroom * free:
            problems.append(f"disk: checkpoints need {human_bytes(checkpoint.total)} but only {human_bytes(free)} is "
                            f"free under {checkpoint_dir}")
            suggestions.append("keep fewer checkpoints (save_total_limit=2), save less often, store banks in fp16, "
                               "or point output_dir at a larger disk")
    report = ResourceReport(ok=not problems, problems=problems, suggestions=suggestions, lines=lines)
    if problems:
        if strict:
            raise ResourceError("not enough resources for this run:\n" + str(report))
        logger.warning("capsparse: %s", report)
    return report


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C: stop cleanly after a checkpoint
# ---------------------------------------------------------------------------------------------------------


class GracefulStop:
    """First SIGINT/SIGTERM sets :attr:`requested` (the loop saves a checkpoint and stops); a second SIGINT
    restores the previous handler and raises ``KeyboardInterrupt`` at once.

    Use as a context manager (handlers restored on exit); main thread only (a no-op elsewhere)::

        with GracefulStop() as stop:
            for step in ...:
                train_step()
                if stop.requested:
                    save_checkpoint(...)
                    break
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        self.signal_received = signum
        logger.warning("capsparse: %s received: stopping after this step and a checkpoint (Ctrl-C again to "
                       "abort now)", signal.Signals(signum).name)

    def install(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False


def _make_callback_class():
    from transformers import TrainerCallback

    class GracefulStopCallback(TrainerCallback):
        """Trainer callback: after Ctrl-C the current step finishes, then ``control.should_save`` and
        ``control.should_training_stop`` make the Trainer write ``checkpoint-N`` and return from ``train()``
        normally. Handlers are installed in ``on_train_begin`` and restored in ``on_train_end``."""

        def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
            self.stop = GracefulStop(signals)

        @property
        def requested(self) -> bool:
            return self.stop.requested

        def on_train_begin(self, args, state, control, **kwargs):
            self.stop.install()

        def on_step_end(self, args, state, control, **kwargs):
            if self.stop.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.stop.uninstall()

    GracefulStopCallback.__module__ = __name__
    return GracefulStopCallback


_LAZY: Dict[str, object] = {}


def __getattr__(name):
    if name == "GracefulStopCallback":
        if name not in _LAZY:
            _LAZY[name] = _make_callback_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ResourceError", "MemoryEstimate", "ResourceReport", "estimate_bank_bytes", "estimate_checkpoint_bytes",
           "available_ram", "available_gpu_memory", "available_disk", "check_resources", "dtype_bytes",
           "human_bytes", "GracefulStop", "GracefulStopCallback"]
