"""Drop-in modules whose dropout is :func:`capsparse.ops.dropout` (seed-determined masks, about 10x faster than
``nn.Dropout`` on CPU): :class:`Dropout` and :class:`BertSelfAttention`. :func:`capsparse.sparsify` swaps them in
(``capsparse.surgery.fast_dropout``); the state dict keys stay those of the modules they replace."""
from __future__ import annotations

from torch import nn

from ..ops.attention import attention
from ..ops.dropout import dropout


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same ``isinstance``) with the seed-determined mask; ``inplace`` is ignored
    (the op never writes its input)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)

    @classmethod
    def from_dropout(cls, module: nn.Dropout) -> "Dropout":
        new = cls(module.p)
        new.train(module.training)
        return new


# what transformers' BertSelfAttention.__init__ sets besides its children
_ATTENTION_ATTRS = ("config", "num_attention_heads", "attention_head_size", "all_head_size", "scaling", "is_decoder",
                    "is_causal", "layer_idx")


def _copy_attention(src: nn.Module, dst: nn.Module) -> None:
    dst.query, dst.key, dst.value, dst.dropout = src.query, src.key, src.value, src.dropout
    for name in _ATTENTION_ATTRS:
        setattr(dst, name, getattr(src, name))
    dst.train(src.training)


class BertSelfAttention(nn.Module):
    """transformers' encoder ``BertSelfAttention`` (sdpa, no cache) whose training path is
    :func:`capsparse.ops.attention`: the same ``query`` / ``key`` / ``value`` / ``dropout`` children and head
    attributes (structured pruning and export change them on the instance, as on the original)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        _copy_attention(original, self)

    def to_original(self) -> nn.Module:
        """transformers' ``BertSelfAttention`` with this module's children and head attributes (``densify``)."""
        from transformers.models.bert.modeling_bert import BertSelfAttention as Original

        original = Original.__new__(Original)  # its __init__ would allocate new q / k / v weights
        nn.Module.__init__(original)
        _copy_attention(self, original)
        return original

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("cache: capsparse's BertSelfAttention is encoder self-attention only, got a cache")
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q, k, v = (layer(hidden_states).view(shape).transpose(1, 2) for layer in (self.query, self.key, self.value))
        out = attention(q, k, v, attention_mask, p=self.dropout.p if self.training else 0.0, scale=self.scaling)
        return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), None
