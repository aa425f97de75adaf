"""Crash-safe checkpoints: atomic files, atomic manifested directories, verification and safe loading.

Guarantees (tested in ``tests/test_reliability_checkpoint.py`` and ``tests/test_reliability_kill.py``):

* :func:`atomic_write` / :func:`atomic_write_bytes`: a reader sees either the old file or the complete new
  one, never a prefix (temp file in the same directory, flush + fsync, ``os.replace``, fsync of the directory).
* :func:`atomic_checkpoint_dir`: a checkpoint is written into ``<name>.tmp/``; every file is fsynced, then
  ``manifest.json`` (size + sha256 of every file) is written last, then the directory is renamed to
  ``<name>/`` and the parent directory is fsynced. A directory without a manifest is incomplete by definition.
* :func:`verify_checkpoint` detects missing, truncated and corrupted files and names the file.
* :func:`latest_valid_checkpoint` returns the newest checkpoint that verifies, logging a warning for each
  broken one it skips.
* :func:`save_state` / :func:`load_state`: tensors through safetensors, metadata through JSON; legacy
  ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)`` only, so an untrusted pickle cannot
  run code.
* Hugging Face ``Trainer`` checkpoints (``checkpoint-N/``, written in place by the Trainer) become atomic with
  :class:`AtomicCheckpointCallback`: the manifest is the commit record, written last in ``on_save``; on resume
  :func:`resolve_resume_checkpoint` picks the newest checkpoint whose manifest verifies.

Importing this module imports torch only (transformers is imported when the callback class is first used).
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
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ._lazy import lazy_callbacks

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "state.safetensors"
META_NAME = "meta.json"
MANIFEST_FORMAT = 1
_CKPT_RE = re.compile(r"^(?:ckpt|checkpoint)-(\d+)$")
_CHUNK = 1 << 20

# Fault injection for the kill tests: called with an event name at each stage of a checkpoint write
# ("file", "before_manifest", "before_rename", "after_rename"). ``None`` in normal use.
FAULT_HOOK: Optional[Callable[[str], None]] = None


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated or corrupted; the message names the directory and the file."""


def _fault(event: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(event)


# ---------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------


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


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def atomic_save_with(path: PathLike, writer: Callable[[str], None]) -> None:
    """Atomic write for libraries that want a file name (``safetensors.torch.save_file``, ``torch.save``):
    ``writer(tmp_path)`` writes the temp file, which is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(str(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------------


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


def latest_valid_checkpoint(run_dir: PathLike, deep: bool = True, recover: bool = True) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that verifies, or ``None``.

    Broken checkpoints (no manifest, missing/truncated/corrupted files) are skipped with a warning naming the
    file. With ``recover`` interrupted writes are first finished or discarded (:func:`cleanup_stale`);
    ``*.tmp`` directories are never returned.
    """
    if recover:
        cleanup_stale(run_dir)
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


@contextlib.contextmanager
def atomic_checkpoint_dir(final_dir: PathLike) -> Iterator[Path]:
    """Yield a temp directory ``<final_dir>.tmp``; on success manifest it and rename it to ``final_dir``.

    A stale ``.tmp`` from an interrupted write is removed first. If ``final_dir`` exists it is replaced (the
    old one is renamed to ``<final_dir>.old`` first and removed after the new one is in place). On an
    exception the temp directory is removed and ``final_dir`` is untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    old = final_dir.with_name(final_dir.name + ".old")
    _remove_tree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_tree(tmp)
        raise
    _fault("before_rename")
    if final_dir.exists():
        _remove_tree(old)
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    fsync_dir(final_dir.parent)
    _fault("after_rename")
    _remove_tree(old)


def cleanup_stale(run_dir: PathLike) -> List[Path]:
    """Finish or undo checkpoint writes interrupted by a crash; returns the paths acted on.

    ``ckpt-N.tmp`` with a valid manifest and no ``ckpt-N`` (killed between the manifest and the rename) is
    promoted to ``ckpt-N``; ``ckpt-N.old`` with no ``ckpt-N`` (killed while replacing) is restored; every
    other ``.tmp`` / ``.old`` leftover is removed.
    """
    run_dir = Path(run_dir)
    acted = []
    if not run_dir.is_dir():
        return acted
    for p in sorted(run_dir.iterdir()):
        if not (p.is_dir() and p.suffix in (".tmp", ".old") and _CKPT_RE.match(p.stem)):
            continue
        final = p.with_name(p.stem)
        if not final.exists() and is_valid_checkpoint(p)[0]:
            os.replace(p, final)
            logger.warning("capsparse: recovered interrupted checkpoint write %s -> %s", p.name, final.name)
        else:
            _remove_tree(p)
        acted.append(p)
    if acted:
        fsync_dir(run_dir)
    return acted


def rotate_checkpoints(run_dir: PathLike, keep_last: int) -> List[Path]:
    """Delete every checkpoint older than the ``keep_last`` newest *valid* ones (a broken checkpoint never
    counts towards ``keep_last``, so a valid fallback always survives). Returns the deleted paths."""
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last: expected an int >= 1, got {keep_last!r}")
    deleted, kept_valid = [], 0
    for path in list_checkpoints(run_dir):
        if kept_valid >= keep_last:
            _remove_tree(path)
            deleted.append(path)
        elif is_valid_checkpoint(path, deep=False)[0]:
            kept_valid += 1
    return deleted


# ---------------------------------------------------------------------------------------------------------
# Tensors + metadata
# ---------------------------------------------------------------------------------------------------------


def _check_tensors(tensors) -> Dict[str, torch.Tensor]:
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: expected str keys, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors: {name!r} is a {type(value).__name__}, expected a torch.Tensor")
        if value.is_sparse or value.layout != torch.strided:
            raise TypeError(f"tensors: {name!r} has layout {value.layout}; store dense tensors (or their parts)")
        out[name] = value.detach().cpu().contiguous()
    return out


def _unshare(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage: clone all but the first user of each storage."""
    seen = set()
    out = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t
    return out


def save_state(directory: PathLike, tensors: Dict[str, torch.Tensor], meta: Optional[dict] = None,
               name: str = "state") -> None:
    """Write ``<name>.safetensors`` (tensors, moved to CPU) and ``<name>.json`` (JSON ``meta``), each atomically.

    Use inside :func:`atomic_checkpoint_dir` to make the whole directory atomic and manifested.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name: expected a plain file stem, got {name!r}")
    tensors = _unshare(_check_tensors(tensors))
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"meta: expected a JSON-serialisable dict, got {type(meta).__name__}")
    try:
        text = json.dumps(meta, indent=1, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta: not JSON-serialisable ({exc})") from None
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_with(directory / f"{name}.safetensors", lambda p: save_file(tensors, p))
    _fault("file")
    atomic_write_text(directory / f"{name}.json", text)
    _fault("file")


def safe_torch_load(path: PathLike, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, containers and primitives only; no code can run."""
    try:
        return torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError for refused globals
        raise CheckpointError(f"{path}: refused or unreadable with torch.load(weights_only=True): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def load_tensors(path: PathLike, device="cpu") -> Dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a ``.pt``/``.bin`` file via weights-only ``torch.load``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    obj = safe_torch_load(path, map_location=device)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, got {type(obj).__name__}")
    return obj


def load_state(directory: PathLike, name: str = "state", device="cpu",
               verify: Union[bool, str] = "auto") -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` written by :func:`save_state`.

    ``verify``: ``"auto"`` verifies against ``manifest.json`` when there is one, ``True`` requires it (a
    directory without a manifest is an incomplete checkpoint), ``False`` skips it. CheckpointError names a bad
    file. A legacy ``<name>.pt`` is accepted in place of the safetensors file, loaded weights-only.
    """
    directory = Path(directory)
    if verify not in (True, False, "auto"):
        raise ValueError(f"verify: expected True, False or 'auto', got {verify!r}")
    if verify is True or (verify == "auto" and (directory / MANIFEST_NAME).exists()):
        verify_checkpoint(directory)
    st, pt = directory / f"{name}.safetensors", directory / f"{name}.pt"
    if st.is_file():
        tensors = load_tensors(st, device)
    elif pt.is_file():
        tensors = load_tensors(pt, device)
    else:
        raise CheckpointError(f"{directory}: no {st.name} (or {pt.name}) to load")
    meta_path = directory / f"{name}.json"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{meta_path}: corrupted metadata ({exc})") from None
    return tensors, meta


def save_checkpoint(run_dir: PathLike, step: int, tensors: Dict[str, torch.Tensor], meta: Optional[dict] = None,
                    keep_last: Optional[int] = None, prefix: str = "ckpt") -> Path:
    """Atomic, manifested ``<run_dir>/<prefix>-<step>/`` holding :func:`save_state` files; then rotation."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if prefix not in ("ckpt", "checkpoint"):
        raise ValueError(f"prefix: expected 'ckpt' or 'checkpoint', got {prefix!r}")
    final = Path(run_dir) / f"{prefix}-{step}"
    with atomic_checkpoint_dir(final) as tmp:
        save_state(tmp, tensors, meta)
    if keep_last is not None:
        rotate_checkpoints(run_dir, keep_last)
    return final


# ---------------------------------------------------------------------------------------------------------
# Nested state (optimizer / scheduler state dicts) as tensors + JSON
# ---------------------------------------------------------------------------------------------------------


def flatten_tree(obj, prefix: str) -> Tuple[Dict[str, torch.Tensor], object]:
    """Split a nested structure of dicts/lists/tuples/tensors/primitives (e.g. ``optimizer.state_dict()``)
    into ``(tensors, skeleton)``: tensors keyed ``<prefix>.<path>`` and a JSON-serialisable skeleton.
    Dict keys keep their type (int keys of optimizer states survive). Inverse: :func:`unflatten_tree`."""
    tensors: Dict[str, torch.Tensor] = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"{prefix}: unsupported dict key {k!r} at {path}")
                items.append([k, walk(v, f"{path}.{k}")])
            return {"__dict__": items}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"{prefix}: unsupported value of type {type(x).__name__} at {path}")

    return tensors, walk(obj, prefix)


def unflatten_tree(skeleton, tensors: Dict[str, torch.Tensor]):
    def walk(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                name = x["__tensor__"]
                if name not in tensors:
                    raise CheckpointError(f"tensors: missing {name!r} referenced by the saved state")
                return tensors[name]
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            raise CheckpointError(f"skeleton: unexpected object {sorted(x)}")
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


# ---------------------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch CPU and CUDA) as tensors + JSON
# ---------------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """All RNG states as ``(tensors, meta)`` for :func:`save_state`; ``generators`` adds named torch generators."""
    import random

    tensors = {"rng.torch": torch.get_rng_state()}
    meta: dict = {"python": _jsonable(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for name, gen in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = gen.get_state()
    return tensors, meta


def restore_rng_state(tensors: Dict[str, torch.Tensor], meta: dict,
                      generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import random

    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tupled(meta["python"]))
    if "numpy" in meta and "rng.numpy_keys" in tensors:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    for name, gen in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key not in tensors:
            raise CheckpointError(f"generators: no saved state for generator {name!r}")
        gen.set_state(tensors[key])


def _jsonable(obj):
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    return obj


def _tupled(obj):
    if isinstance(obj, list):
        return tuple(_tupled(x) for x in obj)
    return obj


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Trainer integration
# ---------------------------------------------------------------------------------------------------------


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
        cleanup_stale(output_dir)
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
                cleanup_stale(args.output_dir)
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

__all__ = ["CheckpointError", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_save_with", "fsync_dir", "write_manifest", "read_manifest", "verify_checkpoint",
           "is_valid_checkpoint", "list_checkpoints", "latest_valid_checkpoint", "atomic_checkpoint_dir",
           "cleanup_stale", "rotate_checkpoints", "save_state", "load_state", "load_tensors", "safe_torch_load",
           "save_checkpoint", "flatten_tree", "unflatten_tree", "capture_rng_state", "restore_rng_state", "quarantine_broken_checkpoints",
           "resolve_resume_checkpoint", "AtomicCheckpointCallback"]
