"""Drop-in sparse layers."""
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
