"""Model surgery: swap ``nn.Linear`` instances for :class:`SparseLinear` and back, and dropout for the fast one.

Only module instances are replaced (``setattr`` on the parent); no class is patched, so nothing
leaks between models or tests.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Union

from torch import nn

from .layout import BlockSize, check_block_divides, normalize_block_size
from .nn.dropout import BertSelfAttention, Dropout
from .nn.sparse_linear import SparseLinear

# The six encoder linears of each BERT-family layer (transformers 5 module names).
BERT_ENCODER_TARGETS = (
    r"(^|\.)encoder\.layer\.\d+\.attention\.self\.(query|key|value)$",
    r"(^|\.)encoder\.layer\.\d+\.attention\.output\.dense$",
    r"(^|\.)encoder\.layer\.\d+\.intermediate\.dense$",
    r"(^|\.)encoder\.layer\.\d+\.output\.dense$",
)
# Never pruned, whatever the patterns say: CAP and movement pruning keep these dense.
PROTECTED = re.compile(r"(^|\.)(embeddings|pooler|classifier|qa_outputs|cls|lm_head)(\.|$)")


@dataclass
class SurgeryReport:
    """What :func:`sparsify` / :func:`densify` swapped."""

    swapped: List[str] = field(default_factory=list)
    block_size: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        kind = "element masks" if self.block_size is None else f"block size {self.block_size}"
        return f"swapped {len(self.swapped)} linears ({kind})"


def _compile_targets(targets: Union[str, Sequence[str]]) -> List[re.Pattern]:
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("targets: expected at least one regular expression, got an empty list")
    compiled = []
    for pattern in targets:
        if not isinstance(pattern, str):
            raise TypeError(f"targets: expected regular expressions (str), got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"targets: {pattern!r} is not a valid regular expression ({exc})") from None
    return compiled


def find_targets(model: nn.Module, targets: Union[str, Sequence[str]] = BERT_ENCODER_TARGETS,
                 module_type=nn.Linear) -> List[str]:
    """Qualified names of the ``module_type`` modules that match any pattern; each pattern must match."""
    patterns = _compile_targets(targets)
    hits = {p.pattern: 0 for p in patterns}
    names = []
    for name, module in model.named_modules():
        if type(module) is not module_type:
            continue
        matched = [p for p in patterns if p.search(name)]
        if not matched:
            continue
        if PROTECTED.search(name):
            raise ValueError(f"targets: pattern {matched[0].pattern!r} selects {name!r}, but embeddings, pooler and "
                             f"task heads are never pruned; narrow the pattern")
        for p in matched:
            hits[p.pattern] += 1
        names.append(name)
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets: pattern(s) {missing} matched no {module_type.__name__} in "
                         f"{type(model).__name__}; expected module names like 'bert.encoder.layer.0.intermediate.dense'")
    return names


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _swap_each(model: nn.Module, replacement) -> List[str]:
    """Swap every module for which ``replacement(module)`` gives a new one; returns the swapped names."""
    names = []
    for name, module in list(model.named_modules()):
        new = replacement(module)
        if new is not None:
            _swap(model, name, new)
            names.append(name)
    return names


def fast_dropout(model: nn.Module) -> List[str]:
    """Swap every ``nn.Dropout`` of ``model`` for :class:`capsparse.nn.Dropout` and every encoder
    ``BertSelfAttention`` running sdpa for :class:`capsparse.nn.BertSelfAttention`, in place. Same distribution
    (keep ``1 - p``, scale ``1 / (1 - p)``), other random draws; eval is unchanged. Returns the swapped names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    attention_type = None
    try:
        from transformers.models.bert.modeling_bert import BertSelfAttention as attention_type
    except ImportError:  # no transformers: no BERT attention to swap
        pass

    def fast(module):
        if type(module) is nn.Dropout:
            return Dropout.from_dropout(module)
        if (attention_type is not None and type(module) is attention_type and not module.is_causal
                and getattr(module.config, "_attn_implementation", None) == "sdpa"):
            return BertSelfAttention(module)
        return None

    return _swap_each(model, fast)


def restore_dropout(model: nn.Module) -> List[str]:
    """Undo :func:`fast_dropout` in place: :class:`capsparse.nn.Dropout` back to ``nn.Dropout`` (same ``p``) and
    :class:`capsparse.nn.BertSelfAttention` back to transformers' class (same children). Returns the swapped names."""

    def plain(module):
        if type(module) is Dropout:
            new = nn.Dropout(module.p)
            new.train(module.training)
            return new
        return module.to_original() if type(module) is BertSelfAttention else None

    return _swap_each(model, plain)


def sparsify(model: nn.Module, block_size: Optional[BlockSize] = None,
             targets: Union[str, Sequence[str]] = BERT_ENCODER_TARGETS, backend: Optional[str] = None,
             dropout: bool = True) -> SurgeryReport:
    """Swap the target linears of ``model`` for :class:`SparseLinear` in place (all-ones masks).

    Args:
        model: a Hugging Face BERT-family model (or any module).
        block_size: ``None`` for element masks, else ``b`` or ``(bm, bk)`` for block layouts.
        targets: regular expressions over qualified module names; the default selects the six encoder
            linears of every layer (72 for BERT-base, 36 for a 6-layer model).
        backend: backend forced for the new layers (``None``: automatic).
        dropout: also swap dropout and sdpa self-attention for the fast, seed-determined dropout
            (:func:`fast_dropout`; in a CAP step the torch dropout masks cost more than the sparse linears).

    Returns:
        a :class:`SurgeryReport` listing the swapped linears. Validation happens before any swap.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    pair = None if block_size is None else normalize_block_size(block_size)
    names = find_targets(model, targets)
    if pair is not None:
        for name in names:
            linear = model.get_submodule(name)
            check_block_divides((linear.out_features, linear.in_features), pair, name=f"{name}.weight")
    for name in names:
        _swap(model, name, SparseLinear.from_linear(model.get_submodule(name), block_size=pair, backend=backend))
    if dropout:
        fast_dropout(model)
    return SurgeryReport(swapped=names, block_size=pair)


def sparse_layers(model: nn.Module) -> Iterable[tuple]:
    """``(name, SparseLinear)`` pairs of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]


@contextlib.contextmanager
def exact_state_dict(model: nn.Module):
    """Within the block, ``model.state_dict()`` holds each SparseLinear's dense weight as it is (pruned entries
    included, for training checkpoints that resume exactly) instead of ``W * M``."""
    layers = [m for _, m in sparse_layers(model)]
    before = [getattr(m, "state_dict_exact", False) for m in layers]
    for m in layers:
        m.state_dict_exact = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.state_dict_exact = b


def densify(model: nn.Module) -> SurgeryReport:
    """Swap every :class:`SparseLinear` back to ``nn.Linear`` with its mask baked in, and the fast dropout
    modules that :func:`sparsify` swapped in back to torch's / transformers' (:func:`restore_dropout`)."""
    names = [n for n, _ in sparse_layers(model)]
    if not names:
        raise ValueError(f"model: expected at least one SparseLinear to densify in {type(model).__name__}, found none")
    for name in names:
        _swap(model, name, model.get_submodule(name).to_linear())
    restore_dropout(model)
    return SurgeryReport(swapped=names)
