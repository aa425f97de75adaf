"""Pruned models in the Hugging Face format: ``model.save_pretrained(d)`` and :func:`from_pretrained`.

``save_pretrained`` of a model with :class:`~capsparse.nn.SparseLinear` layers writes an ordinary transformers
directory: each pruned linear's ``weight`` is stored as ``W * M`` (pruned entries are exact zeros) and its mask as
``<name>.mask`` (element mask, bool ``[out, in]``) or ``<name>.block_mask`` (bool ``[out/bm, in/bk]``; the block
size is ``out/rows x in/cols``). So:

* :func:`from_pretrained` gives back the same pruned model: the masked linears as SparseLinear with their masks
  and layouts (same logits, same zeros);
* plain ``AutoModel...from_pretrained(d)`` loads the same pruned weights into dense ``nn.Linear`` layers (same
  logits and zeros, computed densely); its load report lists the mask tensors as unexpected.

A compressed export (:func:`capsparse.export.export_compressed`) stores only the kept weights; plain
transformers refuses it (size mismatch of every pruned weight) and :func:`from_pretrained` reads it through
:func:`capsparse.export.load_compressed`. Only safetensors and JSON are read (no pickle).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .export import WEIGHTS_FILE, PathLike, is_compressed_dir, load_compressed
from .nn.sparse_linear import SparseLinear
from .surgery import _swap

INDEX_FILE = "model.safetensors.index.json"
MASK_KEYS = {"mask": "element", "block_mask": "block"}


def weight_files(path: PathLike) -> list:
    """The safetensors file(s) of a transformers directory (sharded or not); a clear error when there are none."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: unreadable safetensors index ({exc})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    if any(path.glob("*.bin")):
        raise ValueError(f"{path}: only safetensors weights are read (no pickle); found .bin files, re-save the "
                         f"model with save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}; expected a directory written by "
                            f"save_pretrained or capsparse.export_compressed")


def read_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{file}: unreadable safetensors file ({exc})") from None
    return tensors


def sparse_layout(tensors: Dict[str, torch.Tensor]) -> Dict[str, Optional[Tuple[int, int]]]:
    """``{layer name: None (element mask) or (bm, bk)}`` read from the mask tensors saved beside the weights."""
    layout = {}
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        if leaf not in MASK_KEYS or f"{name}.weight" not in tensors:
            continue
        weight = tensors[f"{name}.weight"]
        if value.dtype != torch.bool or value.dim() != 2 or weight.dim() != 2:
            raise ValueError(f"{key}: expected a 2-D bool mask beside a 2-D weight, got {value.dtype} "
                             f"{list(value.shape)} (weight {list(weight.shape)})")
        if leaf == "mask":
            if value.shape != weight.shape:
                raise ValueError(f"{key}: mask shape {list(value.shape)} differs from the weight's "
                                 f"{list(weight.shape)}")
            layout[name] = None
        else:
            (n, k), (r, c) = weight.shape, value.shape
            if r == 0 or c == 0 or n % r or k % c:
                raise ValueError(f"{key}: block mask {[r, c]} does not tile the weight {[n, k]}")
            layout[name] = (n // r, k // c)
    return layout


def _model_class(config, model_class):
    import transformers

    if model_class is not None:
        return model_class
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"config.json names no transformers model class (architectures={arch!r}); pass "
                         f"model_class=, e.g. transformers.AutoModelForSequenceClassification")
    return cls


def from_pretrained(path: PathLike, model_class=None, backend: Optional[str] = None,
                    device: Union[str, torch.device] = "cpu", return_tokenizer: bool = False):
    """Load a pruned model saved by ``save_pretrained`` / ``CAPTrainer.save_model`` (or a compressed export).

    The linears saved with a mask come back as :class:`SparseLinear` with that mask or block layout; everything
    else loads as in transformers. Every tensor must match: a missing or unexpected tensor (other than the
    ``position_ids`` buffer and tied weights) is an error naming it. The model is returned in eval mode.

    Args:
        path: a directory written by ``save_pretrained`` (a ``checkpoint-N`` of a CAPTrainer run works too) or
            by :func:`capsparse.export_compressed`.
        model_class: the transformers class or Auto class to build (default: ``config.architectures[0]``).
        backend: force a backend for the SparseLinear layers (default: automatic).
        device: where to put the model.
        return_tokenizer: also load the tokenizer saved in ``path`` and return ``(model, tokenizer)``.
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {path} is not a directory")
    if is_compressed_dir(path):
        return load_compressed(path, backend=backend, device=device, return_tokenizer=return_tokenizer)
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = _model_class(config, model_class)
    tensors = read_tensors(path)
    with torch.device("cpu"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)  # Auto class or concrete
    for name, block in sparse_layout(tensors).items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path}: {name!r} has a mask but is a {type(linear).__name__} in {type(model).__name__}")
        _swap(model, name, SparseLinear.from_linear(linear, block_size=block, backend=backend))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if not k.endswith("position_ids") and k not in tied]
    if unexpected:
        raise ValueError(f"{path}: tensors {sorted(unexpected)[:5]} fit no module of {type(model).__name__}"
                         + (" (movement scores: save after CAPTrainer.finalize(), or with CAPTrainer.save_model)"
                            if any(k.endswith("_scores") for k in unexpected) else ""))
    if missing:
        raise ValueError(f"{path}: tensors missing from the weights: {sorted(missing)[:5]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device).eval()
    if return_tokenizer:
        return model, transformers.AutoTokenizer.from_pretrained(str(path))
    return model


def _tied_keys(model) -> set:
    """State-dict keys that save_pretrained leaves out because they are tied to another tensor."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())


def is_capsparse_pretrained(path: PathLike) -> bool:
    """True when ``path`` holds a transformers model saved with SparseLinear masks (reads key names only)."""
    from safetensors import safe_open

    try:
        files = weight_files(path)
    except (FileNotFoundError, ValueError):
        return False
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if any(k.rpartition(".")[2] in MASK_KEYS for k in f.keys()):
                return True
    return False


__all__ = ["from_pretrained", "is_capsparse_pretrained", "sparse_layout", "weight_files"]
