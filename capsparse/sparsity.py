"""The one sparsity report: how much of a model's prunable linears is removed, whichever way it was removed.

Three ways remove weights, checked in this order:

- head / FFN-neuron masks (CAP-f before compaction): float buffers ``cap_head_mask`` / ``cap_neuron_mask`` on
  the attention-output and FFN-output modules; a masked head removes its rows of query/key/value and its columns
  of the attention output, a masked neuron its row of the intermediate and its column of the FFN output;
- :class:`SparseLinear` masks (unstructured and block methods): the kept weights of each element mask;
- physical removal (CAP-f after compaction): the encoder's heads and FFN width against the model config.

*sparsity* is the removed fraction of those weights, *density* the kept one. ``encoder_params`` also counts the
encoder's biases and LayerNorms as remaining (the official ``counts_parameters.py``). Embeddings, pooler and
the task head are never counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from .nn.sparse_linear import SparseLinear

HEAD_MASK = "cap_head_mask"
NEURON_MASK = "cap_neuron_mask"


@dataclass
class SparsityReport:
    """``sparsity`` of the prunable linears (``1 - kept / total``), per linear, and over the encoder's parameters."""

    sparsity: float = 0.0
    kept: int = 0
    total: int = 0
    per_layer: Dict[str, float] = field(default_factory=dict)
    encoder_params: float = 0.0

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def as_dict(self) -> dict:
        """``{"global", "kept", "total", "per_layer", "encoder_params"}`` (run files store this)."""
        return {"global": float(self.sparsity), "kept": int(self.kept), "total": int(self.total),
                "per_layer": dict(self.per_layer), "encoder_params": float(self.encoder_params)}


def encoder_layers(model: nn.Module) -> List[nn.Module]:
    """``model.base_model.encoder.layer`` as a list (``[]`` for a model without one)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    return list(layers) if layers is not None else []


def structure_of(model: nn.Module) -> Optional[list]:
    """Per encoder layer ``{"heads": n, "intermediate": m}`` when heads/neurons were physically removed
    (e.g. by CAP-f's compaction), else ``None``."""
    config = getattr(model, "config", None)
    layers = encoder_layers(model)
    if config is None or not layers:
        return None
    out, changed = [], False
    for layer in layers:
        try:
            heads = int(layer.attention.self.num_attention_heads)
            inter = int(layer.intermediate.dense.out_features)
        except AttributeError:
            return None
        changed |= heads != config.num_attention_heads or inter != config.intermediate_size
        out.append({"heads": heads, "intermediate": inter})
    return out if changed else None


def _masked_units(model: nn.Module) -> Optional[Tuple[Dict[str, float], float, int]]:
    """``(pruned fraction per linear, pruned weights, total weights)`` from head / neuron masks, or ``None``."""
    layers = [l for l in encoder_layers(model) if getattr(getattr(l, "attention", None), "output", None) is not None
              and getattr(l.attention.output, HEAD_MASK, None) is not None]
    if not layers:
        return None
    per, pruned, total = {}, 0, 0
    names = dict((id(m), n) for n, m in model.named_modules())
    for layer in layers:
        h = getattr(layer.attention.output, HEAD_MASK)
        nm = getattr(layer.output, NEURON_MASK)
        fh = 1.0 - float(h.sum()) / h.numel()
        fn = 1.0 - float(nm.sum()) / nm.numel()
        for lin, frac in ((layer.attention.self.query, fh), (layer.attention.self.key, fh),
                          (layer.attention.self.value, fh), (layer.attention.output.dense, fh),
                          (layer.intermediate.dense, fn), (layer.output.dense, fn)):
            per[names.get(id(lin), str(id(lin)))] = frac
            pruned += frac * lin.weight.numel()
            total += lin.weight.numel()
    return per, pruned, total


def sparsity_report(model: nn.Module, layers: Optional[Sequence[Tuple[str, SparseLinear]]] = None,
                    ignore_params: Iterable[str] = ()) -> SparsityReport:
    """The :class:`SparsityReport` of ``model`` (see the module docstring for what is counted).

    Args:
        layers: count only these ``(name, SparseLinear)`` pairs (a pruner's); default: every SparseLinear.
        ignore_params: name suffixes of training-only parameters left out of ``encoder_params`` (movement scores).
    """
    per: Dict[str, float] = {}
    masked = _masked_units(model) if layers is None else None
    if masked is not None:
        per, pruned, total = masked
        kept = total - int(round(pruned))
    else:
        pruned = kept = total = 0
        for name, layer in (layers if layers is not None else
                            [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]):
            k = int(layer.element_mask().sum())
            n = layer.weight.numel()
            per[name] = 1.0 - k / n
            kept += k
            pruned += n - k
            total += n
        structure = structure_of(model) if total == 0 and layers is None else None
        if structure is not None:
            config = model.config
            h, full_i = config.hidden_size, config.intermediate_size
            d_h = h // config.num_attention_heads
            total = len(structure) * (4 * h * h + 2 * h * full_i)
            kept = sum(4 * h * d["heads"] * d_h + 2 * h * d["intermediate"] for d in structure)
            pruned = total - kept
    global_ = pruned / total if total else 0.0
    ignore = tuple(ignore_params)
    encoder = getattr(getattr(model, "base_model", model), "encoder", model)
    n_enc = sum(p.numel() for n, p in encoder.named_parameters() if not (ignore and n.endswith(ignore)))
    return SparsityReport(sparsity=float(global_), kept=int(kept), total=int(total), per_layer=per,
                          encoder_params=float(pruned / n_enc) if n_enc else 0.0)
