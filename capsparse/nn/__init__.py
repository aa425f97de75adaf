"""Drop-in sparse layers, and the fast-dropout modules that :func:`capsparse.sparsify` swaps in."""
from .dropout import BertSelfAttention, Dropout
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "Dropout", "BertSelfAttention"]
