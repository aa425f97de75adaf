"""Crash-safe Hugging Face ``Trainer`` checkpoints: a manifest written last, verification, resume from the newest
valid checkpoint.

Guarantees (tested in ``tests/test_reliability_checkpoint.py``, ``tests/test_reliability_kill.py`` and
``tests/test_reliability_resources.py``):

* :class:`AtomicCheckpointCallback` makes the ``checkpoint-N/`` directories the Trainer writes in place atomic: in
  ``on_save``, after every file is written, each file is fsynced and ``manifest.json`` (size + sha256 of every
  file) is written last, atomically (:func:`atomic_write`: a temp file, fsync, ``os.replace``, fsync of the
  directory). A directory without a valid manifest is incomplete by definition.
* :func:`verify_checkpoint` detects missing, truncated and corrupted files and names the file.
* :func:`resolve_resume_checkpoint` picks the newest checkpoint whose manifest verifies; broken ones are moved
  aside as ``broken-checkpoint-N`` with a warning naming the file (so the Trainer's rotation and
  ``get_last_checkpoint`` never pick them).

CAPTrainer's own state (``cap_state.pt``) is read with ``torch.load(weights_only=True)``: a crafted pickle cannot
run code. Importing this module imports neither torch nor transformers (the callback class imports transformers
when it is first used).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

from ._lazy import lazy_callbacks

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_CKPT_RE = re.compile(r"^(?:ckpt|checkpoint)-(\d+)$")
_CHUNK = 1 << 20

# Fault injection for the kill tests: called with "before_manifest" once every file of a checkpoint is fsynced and
# before its manifest is written. ``None`` in normal use.
FAULT_HOOK: Optional[Callable[[str], None]] = None


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated or corrupted; the message names the directory and the file."""


def _fault(event: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(event)


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames and creations inside it survive a power loss (no-op on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator:
    """Context manager yielding a file object; on success the file replaces ``path`` atomically.

    The data goes to a temp file in the same directory (so ``os.replace`` is a rename on one file system),
    which is flushed and fsynced before the rename; the directory is fsynced after. On an exception the temp
    file is removed and ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    kwargs = {"encoding": "utf-8"} if mode == "w" else {}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: PathLike, obj) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))


def file_digest(path: PathLike) -> Tuple[int, str]:
    """``(size, sha256 hex)`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def _checkpoint_files(directory: Path) -> List[Path]:
    files = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(f".{MANIFEST_NAME}.tmp"):
            files.append(p)
    return files


def write_manifest(directory: PathLike, fsync: bool = True, extra: Optional[dict] = None) -> dict:
    """fsync every file of ``directory`` (recursively), then write ``manifest.json`` atomically, last.

    The manifest maps each relative path (POSIX separators) to ``{"size", "sha256"}``; ``extra`` is stored
    under ``"extra"`` (e.g. the global step).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory: {directory} does not exist")
    files = {}
    for p in _checkpoint_files(directory):
        if fsync:
            fsync_file(p)
        size, digest = file_digest(p)
        files[p.relative_to(directory).as_posix()] = {"size": size, "sha256": digest}
    if fsync:
        for sub in {p.parent for p in _checkpoint_files(directory)} | {directory}:
            fsync_dir(sub)
    manifest = {"format": MANIFEST_FORMAT, "created": time.time(), "files": files}
    if extra:
        manifest["extra"] = extra
    _fault("before_manifest")
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint: {MANIFEST_NAME} is missing "
                              f"(the write was interrupted before it finished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: corrupted manifest (expected an object with a 'files' mapping)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: unsupported manifest format {manifest.get('format')!r} "
                              f"(expected {MANIFEST_FORMAT})")
    return manifest


def verify_checkpoint(directory: PathLike, deep: bool = True) -> dict:
    """Check a checkpoint directory against its manifest; returns the manifest.

    Args:
        directory: the checkpoint directory.
        deep: also compare sha256 digests (``False``: sizes only, which catches truncation but not bit rot).

    Raises:
        CheckpointError: naming the directory and the first missing, truncated or corrupted file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    manifest = read_manifest(directory)
    for rel, entry in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {rel!r} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            kind = "is truncated" if size < entry.get("size", 0) else "has the wrong size"
            raise CheckpointError(f"{directory}: file {rel!r} {kind}: {size} bytes, expected {entry.get('size')}")
        if deep:
            _, digest = file_digest(path)
            if digest != entry.get("sha256"):
                raise CheckpointError(f"{directory}: file {rel!r} is corrupted: sha256 {digest[:16]}..., "
                                      f"expected {str(entry.get('sha256'))[:16]}...")
    return manifest


def is_valid_checkpoint(directory: PathLike, deep: bool = True) -> Tuple[bool, str]:
    try:
        verify_checkpoint(directory, deep=deep)
    except CheckpointError as exc:
        return False, str(exc)
    return True, "ok"


def checkpoint_step(path: PathLike) -> Optional[int]:
    """``N`` for ``ckpt-N`` / ``checkpoint-N`` directories, else ``None``."""
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: PathLike) -> List[Path]:
    """``ckpt-N`` and ``checkpoint-N`` directories of ``run_dir``, newest (largest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.name), reverse=True)


def latest_valid_checkpoint(run_dir: PathLike, deep: bool = True) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that verifies, or ``None``; broken checkpoints (no manifest,
    missing/truncated/corrupted files) are skipped with a warning naming the file."""
    for path in list_checkpoints(run_dir):
        ok, reason = is_valid_checkpoint(path, deep=deep)
        if ok:
            return path
        logger.warning("capsparse: skipping broken checkpoint: %s", reason)
    return None


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def quarantine_broken_checkpoints(run_dir: PathLike, deep: bool = True) -> List[Path]:
    """Rename each broken ``checkpoint-N`` / ``ckpt-N`` to ``broken-<name>`` (out of the Trainer's sight,
    so that its rotation and ``get_last_checkpoint`` never pick it, and a re-run can write ``checkpoint-N``
    afresh). Returns the new paths."""
    moved = []
    for path in list_checkpoints(run_dir):
        ok, reason = is_valid_checkpoint(path, deep=deep)
        if ok:
            continue
        target = path.with_name(f"broken-{path.name}")
        _remove_tree(target)
        os.replace(path, target)
        logger.warning("capsparse: moved broken checkpoint aside to %s: %s", target, reason)
        moved.append(target)
    if moved:
        fsync_dir(run_dir)
    return moved


def resolve_resume_checkpoint(output_dir: PathLike, resume_from_checkpoint=True, deep: bool = True) -> Optional[str]:
    """What to pass to ``Trainer.train(resume_from_checkpoint=...)``.

    ``True``: the newest checkpoint of ``output_dir`` whose manifest verifies (broken ones are moved aside
    with a warning), or ``None`` to start fresh. A path: verified (CheckpointError if broken). ``None`` /
    ``False``: ``None``.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        quarantine_broken_checkpoints(output_dir, deep=deep)
        latest = latest_valid_checkpoint(output_dir, deep=False)
        return None if latest is None else str(latest)
    verify_checkpoint(resume_from_checkpoint, deep=deep)
    return str(resume_from_checkpoint)


def _make_callback_class():
    from transformers import TrainerCallback

    class AtomicCheckpointCallback(TrainerCallback):
        """Makes Hugging Face ``checkpoint-N`` directories atomic: after the Trainer (and any subclass
        override of ``_save_checkpoint``) has written everything, ``on_save`` fsyncs every file and writes
        ``manifest.json`` last. A checkpoint without a valid manifest is treated as absent on resume.

        Add it **last** (``trainer.add_callback(AtomicCheckpointCallback())``) so that other ``on_save``
        callbacks finish their files first, and use ``save_total_limit >= 2`` (the Trainer rotates old
        checkpoints before ``on_save``). At ``on_train_begin`` broken checkpoints are moved aside.
        """

        def __init__(self, verify_on_save: bool = False):
            self.verify_on_save = verify_on_save
            self.last_manifested: Optional[str] = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and args.output_dir and os.path.isdir(args.output_dir):
                quarantine_broken_checkpoints(args.output_dir, deep=False)

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir():
                logger.warning("capsparse: on_save found no %s to manifest", ckpt)
                return
            write_manifest(ckpt, extra={"global_step": state.global_step})
            if self.verify_on_save:
                verify_checkpoint(ckpt)
            self.last_manifested = str(ckpt)

    return AtomicCheckpointCallback


__getattr__ = lazy_callbacks(__name__, AtomicCheckpointCallback=_make_callback_class)

__all__ = ["CheckpointError", "atomic_write", "atomic_write_json", "fsync_dir", "write_manifest", "read_manifest",
           "verify_checkpoint", "is_valid_checkpoint", "list_checkpoints", "latest_valid_checkpoint",
           "quarantine_broken_checkpoints", "resolve_resume_checkpoint", "AtomicCheckpointCallback"]
