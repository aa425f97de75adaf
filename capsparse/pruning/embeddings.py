"""Freezing the embedding layer while pruning the encoder, as the official unstructured CAP code does."""
from __future__ import annotations

from torch import nn


def embedding_module(model: nn.Module) -> nn.Module:
    """The embedding block of a Hugging Face encoder (``model.<base_model_prefix>.embeddings``)."""
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if not isinstance(emb, nn.Module):
        raise ValueError(f"freeze_embeddings: {type(model).__name__} has no `embeddings` module on its base model; "
                         f"expected a BERT-style encoder, or set freeze_embeddings=False")
    return emb


def freeze_embeddings(model: nn.Module) -> int:
    """Stop gradients to the embeddings (word, position, type, LayerNorm); returns the number of frozen weights."""
    emb = embedding_module(model)
    emb.requires_grad_(False)
    return sum(p.numel() for p in emb.parameters())
