"""Free memory on the host and the accelerator (for placing CAP's banks), and a clean stop on Ctrl-C.

* :func:`available_ram` / :func:`available_gpu_memory`: what :func:`capsparse.cap.banks.choose_bank_device` checks
  the banks' size (:func:`capsparse.cap.banks.estimate_bank_bytes`) against, before anything is allocated.
* :class:`GracefulStop` / :class:`GracefulStopCallback`: the first Ctrl-C (SIGINT, or SIGTERM) requests a stop
  after the current step *and a checkpoint*; a second Ctrl-C interrupts immediately.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Dict, Optional, Sequence

import torch

from ._lazy import lazy_callbacks

logger = logging.getLogger(__name__)


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


class TrainingStopped(RuntimeError):
    """Training was stopped by Ctrl-C or SIGTERM (:class:`GracefulStop`) before its last step. Its checkpoint is
    kept for a resume; what follows a finished run (the target-sparsity check, evaluation, export, ``metrics.json``)
    did not happen, so that a stopped run never reads as a finished one."""

    def __init__(self, step: int, max_steps: int, signum: Optional[int], checkpoints: str):
        self.step, self.max_steps, self.signum, self.checkpoints = step, max_steps, signum, checkpoints
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"stopped by {name} at step {step} of {max_steps}; checkpoint in {checkpoints}: resume "
                         f"with the same command and --resume (Python: train(resume_from_checkpoint=True))")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal (130 for Ctrl-C)."""
        return 128 + int(self.signum or signal.SIGINT)


def stop_requested(trainer) -> Optional[int]:
    """The signal of a graceful stop requested during ``trainer.train()`` (a :class:`GracefulStopCallback` among
    its callbacks), or None."""
    for cb in trainer.callback_handler.callbacks:
        stop = getattr(cb, "stop", None)
        if isinstance(stop, GracefulStop) and stop.requested:
            return stop.signal_received
    return None


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

    return GracefulStopCallback


__getattr__ = lazy_callbacks(__name__, GracefulStopCallback=_make_callback_class)

__all__ = ["available_ram", "available_gpu_memory", "GracefulStop", "GracefulStopCallback", "TrainingStopped",
           "stop_requested"]
