"""Functional sparse ops with autograd, each with a plain PyTorch reference beside it."""
from .block_sparse_linear import block_sparse_grad_weight, block_sparse_linear, block_sparse_linear_reference
from .contrastive import cap_contrastive_loss, cap_contrastive_loss_reference
from .dropout import dropout, dropout_reference
from .masked_linear import masked_linear, masked_linear_reference

__all__ = ["block_sparse_linear", "block_sparse_linear_reference", "block_sparse_grad_weight",
           "masked_linear", "masked_linear_reference", "cap_contrastive_loss", "cap_contrastive_loss_reference",
           "dropout", "dropout_reference"]
