"""Compressed export of pruned models: only the kept weights are stored.

Directory layout written by :func:`export_compressed` (format version 2)::

    <path>/model.safetensors    dense tensors (embeddings, LayerNorms, biases, heads, dense linears) and,
                                per SparseLinear ``<name>``:
                                  element mask: ``<name>.weight`` (kept values, row-major, 1-D) and
                                                ``<name>.weight.mask_bits`` (uint8, capsparse.layout.pack_bits)
                                  block layout: ``<name>.weight`` ``[nnz, bm, bk]`` (kept blocks) and
                                                ``<name>.weight.block_index`` int32 ``[nnz, 2]`` (block row, col)
    <path>/config.json          the transformers model config
    <path>/capsparse.json       capsparse metadata: format version, per-layer kind/shape/block size/nnz,
                                global sparsity, sizes
    <path>/tokenizer files      when a tokenizer is given

The kept values sit under the weight's own name with a shape no dense layer has, so plain transformers
``from_pretrained`` refuses the directory (a size mismatch naming each pruned weight) instead of loading random
weights; version 1 exports (``<name>.weight.values`` / ``<name>.weight.blocks``) still load. A directory whose
``capsparse.json`` is missing or unreadable but whose weights file is marked as an export is an error naming the
file.

Only safetensors and JSON are read back (no pickle). :func:`load_compressed` rebuilds the model with
:class:`~capsparse.nn.SparseLinear` layers carrying the same masks/layouts, so it computes the same logits
as the pruned model, and its forward goes through the default backend (the C++ ``cpu`` backend on CPU
when built). For the Hugging Face format (``save_pretrained``) see :mod:`capsparse.pretrained`.

Structured pruning (CAP-f): after ``CAPTrainer.compact()`` the heads / FFN neurons are physically removed;
the per-layer widths go to ``capsparse.json`` (``structure``) and the compacted linears are stored dense
(they are already small); :func:`load_compressed` rebuilds the narrower layers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .layout import bitmap_from_blocks, pack_bits, unpack_bits
from .nn.sparse_linear import SparseLinear
from .sparsity import encoder_layers, sparsity_report, structure_of

FORMAT = "capsparse-compressed"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "capsparse.json"
PathLike = Union[str, "os.PathLike[str]"]


def is_compressed_dir(path: PathLike) -> bool:
    """True when ``path`` looks like a directory written by :func:`export_compressed`: it has a ``capsparse.json``
    (readable or not) or a weights file marked as an export. :func:`load_compressed` then either loads it or
    raises naming the missing or corrupt file, so a broken export is never read as an ordinary model."""
    path = Path(path)
    if (path / META_FILE).exists():
        return True
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False



def _sparse_modules(model: nn.Module) -> Dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _apply_structure(model: nn.Module, structure: list) -> None:
    """Shrink a freshly built model to the compacted per-layer widths (weights are loaded afterwards)."""
    layers = encoder_layers(model)
    if len(layers) != len(structure):
        raise ValueError(f"structure: {len(structure)} layers in {META_FILE}, {len(layers)} in the config")
    for layer, dims in zip(layers, structure):
        attn = layer.attention.self
        d_h = attn.attention_head_size
        width = int(dims["heads"]) * d_h
        hidden = attn.query.in_features
        for name in ("query", "key", "value"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(hidden, width, bias=old.bias is not None))
        old = layer.attention.output.dense
        layer.attention.output.dense = nn.Linear(width, old.out_features, bias=old.bias is not None)
        attn.num_attention_heads = int(dims["heads"])
        attn.all_head_size = width
        inter = int(dims["intermediate"])
        old = layer.intermediate.dense
        layer.intermediate.dense = nn.Linear(old.in_features, inter, bias=old.bias is not None)
        old = layer.output.dense
        layer.output.dense = nn.Linear(inter, old.out_features, bias=old.bias is not None)


def export_compressed(model: nn.Module, path: PathLike, tokenizer=None, extra_metadata: Optional[dict] = None,
                      values_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Write ``model`` to ``path`` storing only the kept weights of its SparseLinear layers.

    Args:
        model: a (pruned) transformers model whose prunable linears are :class:`SparseLinear`
            (a model without any is exported dense, still in this format).
        path: output directory (created).
        tokenizer: saved alongside when given.
        extra_metadata: JSON-able dict stored under ``"extra"`` in ``capsparse.json`` (e.g. task, method).
        values_dtype: store kept values in this dtype (e.g. ``torch.float16``); default: the weights' dtype.

    Returns:
        the metadata dict written to ``capsparse.json`` (with ``file_bytes`` of the weights file,
        ``dense_bytes`` the size of an fp32 dense copy, and ``sparsity``).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sparse = _sparse_modules(model)
    sparse_param_names = set()
    tensors: Dict[str, torch.Tensor] = {}
    layers: Dict[str, Dict[str, Any]] = {}
    with torch.no_grad():
        for name, mod in sparse.items():
            w = mod.weight.detach().to("cpu")
            if values_dtype is not None:
                w = w.to(values_dtype)
            sparse_param_names.update({f"{name}.weight", f"{name}.mask", f"{name}.block_mask"})
            info: Dict[str, Any] = {"shape": [mod.out_features, mod.in_features], "bias": mod.bias is not None,
                                    "dtype": str(mod.weight.dtype).replace("torch.", "")}
            if mod.block_size is None:
                mask = mod.mask.to("cpu")
                tensors[f"{name}.weight"] = w[mask].contiguous()
                tensors[f"{name}.weight.mask_bits"] = pack_bits(mask).contiguous()
                info.update(kind="element", block_size=None, nnz=int(mask.sum()))
            else:
                bm, bk = mod.block_size
                bitmap = mod.block_mask.to("cpu")
                r, c = bitmap.shape
                idx = bitmap.nonzero().to(torch.int32)  # row-major order
                blocks = w.reshape(r, bm, c, bk).permute(0, 2, 1, 3)
                tensors[f"{name}.weight"] = blocks[idx[:, 0].long(), idx[:, 1].long()].contiguous()
                tensors[f"{name}.weight.block_index"] = idx.contiguous()
                info.update(kind="block", block_size=[bm, bk], nnz=int(idx.shape[0]) * bm * bk,
                            nnz_blocks=int(idx.shape[0]), grid=[r, c])
            info["density"] = info["nnz"] / (mod.out_features * mod.in_features)
            layers[name] = info
        seen_ptrs = {}
        for key, value in model.state_dict().items():
            if key in sparse_param_names:
                continue
            t = value.detach().to("cpu")
            ptr = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
            if ptr is not None and ptr in seen_ptrs:  # tied tensors: safetensors refuses shared storage
                t = t.clone()
            seen_ptrs[ptr] = key
            tensors[key] = t.contiguous()
    weights_path = out / WEIGHTS_FILE
    save_file(tensors, str(weights_path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        import copy

        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]  # as save_pretrained: not the checkpoint it started from
        config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    stats = sparsity_report(model)
    structure = structure_of(model)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "layers": layers,
        "structure": structure,
        "sparsity": stats.sparsity,
        "kept_weights": stats.kept,
        "prunable_weights": stats.total,
        "num_parameters": n_params,
        "file_bytes": weights_path.stat().st_size,
        "dense_bytes": sum(p.numel() * p.element_size() for p in model.parameters())
        + sum(b.numel() * b.element_size() for n, b in model.named_buffers()
              if not (n.endswith(".mask") or n.endswith(".block_mask"))),
        "extra": extra_metadata or {},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """``capsparse.json`` of an export; errors name the file when it is missing, unreadable or not an object."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; {Path(path)} is not a complete capsparse compressed export "
                                f"(export_compressed writes {META_FILE} beside {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: corrupt ({exc}); re-export the model") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise ValueError(f"{meta_path}: corrupt (expected an object with a 'layers' mapping)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {meta.get('format_version')} is newer than this capsparse "
                         f"reads ({FORMAT_VERSION}); upgrade capsparse")
    return meta


def _build_model(path: Path, meta: Dict[str, Any]):
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    cls_name = meta.get("model_class") or (config.architectures or [None])[0]
    cls = getattr(transformers, cls_name, None) if cls_name else None
    if cls is None:
        raise ValueError(f"{path}: unknown model class {cls_name!r} in {META_FILE} / config.json")
    with torch.device("cpu"):
        model = cls(config)
    return model


def load_compressed(path: PathLike, backend: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                    return_tokenizer: bool = False):
    """Rebuild a model from a :func:`export_compressed` directory.

    The prunable linears come back as :class:`SparseLinear` (element masks or block layouts as exported),
    pruned weights are exact zeros, and the model is in eval mode.

    Args:
        path: the export directory.
        backend: force a backend for the SparseLinear layers (default: automatic, the ``cpu`` kernels on CPU).
        device: where to put the model.
        return_tokenizer: also load the tokenizer saved in ``path`` and return ``(model, tokenizer)``.
    """
    from safetensors import safe_open

    from .surgery import _swap

    path = Path(path)
    meta = read_metadata(path)
    model = _build_model(path, meta)
    if meta.get("structure"):
        _apply_structure(model, meta["structure"])
    layers = meta["layers"]
    v1 = int(meta.get("format_version", 1)) < 2  # kept values under <name>.weight.values / .weight.blocks
    for name, info in layers.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path}: layer {name!r} is {type(linear).__name__}, expected nn.Linear")
        if [linear.out_features, linear.in_features] != list(info["shape"]):
            raise ValueError(f"{path}: layer {name!r} has shape {[linear.out_features, linear.in_features]} in the "
                             f"config but {info['shape']} in {META_FILE}")
        block = tuple(info["block_size"]) if info.get("block_size") else None
        _swap(model, name, SparseLinear.from_linear(linear, block_size=block, backend=backend))

    state: Dict[str, torch.Tensor] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for name, info in layers.items():
                mod = model.get_submodule(name)
                n, k = info["shape"]
                w = torch.zeros(n, k, dtype=mod.weight.dtype)
                if info["kind"] == "element":
                    mask = unpack_bits(f.get_tensor(f"{name}.weight.mask_bits"), (n, k))
                    w[mask] = f.get_tensor(f"{name}.weight.values" if v1 else f"{name}.weight").to(w.dtype)
                    mod.set_mask(mask)
                elif info["kind"] == "block":
                    bm, bk = info["block_size"]
                    idx = f.get_tensor(f"{name}.weight.block_index").long()
                    blocks = f.get_tensor(f"{name}.weight.blocks" if v1 else f"{name}.weight").to(w.dtype)
                    view = w.view(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)
                    view[idx[:, 0], idx[:, 1]] = blocks
                    mod.set_mask(bitmap_from_blocks(idx[:, 0], idx[:, 1], idx.shape[0], (n // bm, k // bk)))
                else:
                    raise ValueError(f"{path}: layer {name!r} has unknown kind {info['kind']!r}")
                mod.weight.copy_(w)
                keys.discard(f"{name}.weight")
                keys.discard(f"{name}.weight.values")
                keys.discard(f"{name}.weight.mask_bits")
                keys.discard(f"{name}.weight.blocks")
                keys.discard(f"{name}.weight.block_index")
        for key in keys:
            state[key] = f.get_tensor(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    sparse_keys = {f"{n}.{s}" for n in layers for s in ("weight", "mask", "block_mask")}
    missing = [m for m in missing if m not in sparse_keys]
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors in {WEIGHTS_FILE}: {sorted(unexpected)[:5]}")
    if missing:
        # position_ids and similar non-persistent/derived buffers may legitimately be absent
        missing = [m for m in missing if not m.endswith("position_ids")]
        if missing:
            raise ValueError(f"{path}: tensors missing from {WEIGHTS_FILE}: {sorted(missing)[:5]}")
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        try:
            model.tie_weights()
        except Exception:  # noqa: BLE001 - heads without tied weights
            pass
    model.to(device)
    model.eval()
    if return_tokenizer:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        return model, tokenizer
    return model


def size_report(path: PathLike) -> Dict[str, Any]:
    """File sizes of an export: weights file, total directory, and the dense fp32 size for comparison."""
    path = Path(path)
    meta = read_metadata(path)
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {"weights_bytes": (path / WEIGHTS_FILE).stat().st_size, "dir_bytes": total,
            "dense_bytes": meta.get("dense_bytes"), "sparsity": meta.get("sparsity"),
            "ratio": (path / WEIGHTS_FILE).stat().st_size / meta["dense_bytes"] if meta.get("dense_bytes") else None}


def load_any(path: PathLike, num_labels: Optional[int] = None, backend: Optional[str] = None,
             question_answering: bool = False) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a compressed export (its own model class, e.g. ``BertForQuestionAnswering``), a
    pruned model saved with ``save_pretrained`` (SparseLinear layers rebuilt, :func:`capsparse.from_pretrained`) or
    an ordinary transformers directory / name (``AutoModelForSequenceClassification``, or
    ``AutoModelForQuestionAnswering`` with ``question_answering=True``)."""
    import transformers

    from .models import resolve_model_path
    from .pretrained import from_pretrained, is_capsparse_pretrained

    if path not in (None, "default") and is_compressed_dir(path):
        return load_compressed(path, backend=backend, return_tokenizer=True)
    resolved = resolve_model_path(path)
    auto = (transformers.AutoModelForQuestionAnswering if question_answering
            else transformers.AutoModelForSequenceClassification)
    if Path(resolved).is_dir() and is_capsparse_pretrained(resolved):
        model, tokenizer = from_pretrained(resolved, model_class=auto, backend=backend, return_tokenizer=True)
        if num_labels is not None and not question_answering and model.config.num_labels != num_labels:
            raise ValueError(f"{resolved}: the pruned model has num_labels={model.config.num_labels}, expected "
                             f"{num_labels}")
        return model, tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolved)
    if question_answering:
        model = auto.from_pretrained(resolved)
    else:
        kwargs = {} if num_labels is None else {"num_labels": num_labels}
        model = auto.from_pretrained(resolved, **kwargs)
    model.eval()
    return model, tokenizer
