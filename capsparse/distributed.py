"""torchrun helpers, in one place: the process group, this process's rank, the world size, a clean shutdown.

Everything here is a no-op answer (rank 0 of 1, no group) in a single process; nothing initialises a group.
"""
from __future__ import annotations

import os


def process_group(multi: bool = False):
    """``torch.distributed`` when a default process group exists (with ``multi=True``: one of more than one
    process, the case where ranks must exchange data), else ``None``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist if not multi or dist.get_world_size() > 1 else None


def rank() -> int:
    """This process's rank under ``torchrun`` (torch.distributed's, else the ``RANK`` variable torchrun sets
    before the process group exists); 0 for a single process."""
    dist = process_group()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of processes of a ``torchrun`` launch (``WORLD_SIZE``); 1 for a single process."""
    dist = process_group()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on rank 0: the one process that writes a run's files (config, metrics, log, model, export, plots)."""
    return rank() == 0


def shutdown_distributed() -> None:
    """Wait for every process, destroy the default process group and free it now; a no-op without one.

    Call it once at the end of a ``torchrun`` script (the CLI does), after dropping the trainer (``del trainer``):
    the DDP-wrapped model keeps the gloo group alive, and a group still alive when Python finalizes can abort the
    process ("terminate called without an active exception": a gloo worker thread that needs the GIL during
    finalization is unwound through C++ code that may not throw).
    """
    import gc

    dist = process_group()
    if dist:
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # the last references (DDP reducer) often sit in cycles: free the group and join its threads


def all_reduce_mean(tensor):
    """The mean of ``tensor`` over the processes of a multi-process group (a new tensor); ``tensor`` itself in a
    single process. For state kept outside the parameters, which DDP does not reduce (e.g. saliency gradients)."""
    dist = process_group(multi=True)
    if dist is None:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())
