"""``SparseLinear``: a drop-in ``nn.Linear`` holding a dense weight plus an element mask or a block layout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layout import (BlockLayout, BlockSize, check_block_divides, check_block_mask, expand_bitmap,
                      normalize_block_size)
from ..ops.block_sparse_linear import block_sparse_linear
from ..ops.masked_linear import check_mask, masked_linear


class SparseLinear(nn.Module):
    """``y = x (W * M)^T + b`` where ``M`` is an element mask (``block_size=None``) or a block mask.

    The weight stays dense (so masks can change while training); the mask lives in a buffer
    (``mask`` ``[out, in]`` or ``block_mask`` ``[out/bm, in/bk]``, both bool) and round-trips
    through ``state_dict``. Kernel metadata and the masked-weight cache are rebuilt only when the
    mask buffer or the weight changes (tracked by tensor versions, no host sync). Under
    ``torch.compile`` the caches are bypassed (both are a few traced tensor ops), so a model with
    these layers compiles with ``fullgraph=True``.

    Block layouts carry a host-side density hint (kept fraction, from :meth:`set_mask`) that lets
    a backend run dense GEMMs below its crossover sparsity; it is dropped when the mask buffer is
    changed behind the layer's back, and not used under ``torch.compile``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: Optional[BlockSize] = None,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.backend = backend
        self.block_size = None if block_size is None else normalize_block_size(block_size)
        if self.block_size is None:
            self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        else:
            check_block_divides((out_features, in_features), self.block_size)
            bm, bk = self.block_size
            self.register_buffer("block_mask", torch.ones(out_features // bm, in_features // bk, dtype=torch.bool,
                                                          device=device))
        self._layout: Optional[BlockLayout] = None
        self._layout_key = None
        self._masked_weight: Optional[torch.Tensor] = None
        self._masked_key = None
        self._note_density(1.0)
        nn.Linear.reset_parameters(self)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: Optional[BlockSize] = None,
                    backend: Optional[str] = None) -> "SparseLinear":
        """Wraps ``linear``'s parameters (shared, not copied) with an all-ones mask."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if block_size is not None:
            check_block_divides((linear.out_features, linear.in_features), normalize_block_size(block_size),
                                name="linear.weight")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        module.backend = backend
        module.block_size = None if block_size is None else normalize_block_size(block_size)
        device = linear.weight.device
        if module.block_size is None:
            module.register_buffer("mask", torch.ones_like(linear.weight, dtype=torch.bool))
        else:
            bm, bk = module.block_size
            module.register_buffer("block_mask", torch.ones(linear.out_features // bm, linear.in_features // bk,
                                                            dtype=torch.bool, device=device))
        module._layout = module._layout_key = module._masked_weight = module._masked_key = None
        module._note_density(1.0)
        module.train(linear.training)
        return module

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask baked into the weight (pruned entries are zeros)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.element_mask().to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear

    # -- masks --------------------------------------------------------------------------------
    @property
    def is_block_sparse(self) -> bool:
        return self.block_size is not None

    def element_mask(self) -> torch.Tensor:
        """The ``[out, in]`` bool mask (expanded from the block mask for block layouts)."""
        if self.block_size is None:
            return self.mask
        return expand_bitmap(self.block_mask, self.block_size)

    @property
    def density(self) -> float:
        """Fraction of weights kept (a Python float: syncs once)."""
        source = self.mask if self.block_size is None else self.block_mask
        return float(source.float().mean()) if source.numel() else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def set_mask(self, mask: torch.Tensor, density: Optional[float] = None) -> None:
        """Set the kept weights: a bool ``[out, in]`` element mask, or for block layouts a bool block mask
        ``[out/bm, in/bk]``. Copies into the existing buffer (no reallocation).

        ``density``: the mask's kept fraction if the caller knows it on the host (a pruning schedule
        does), so that no device sync is needed to pick dense or sparse kernels; for CPU masks it
        is computed here when not given.
        """
        if density is not None and not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
            raise ValueError(f"density: expected a kept fraction in [0, 1] or None, got {density!r}")
        if self.block_size is None:
            check_mask(mask, self.weight)
            with torch.no_grad():
                self.mask.copy_(mask)
            return
        check_block_mask(mask, tuple(self.block_mask.shape), self.block_size, name="mask")
        if mask.device != self.block_mask.device:
            raise ValueError(f"mask: expected device {self.block_mask.device}, got {mask.device}")
        with torch.no_grad():
            self.block_mask.copy_(mask)
        if density is None and mask.device.type == "cpu":
            density = float(mask.float().mean()) if mask.numel() else 0.0
        self._note_density(density)

    def _note_density(self, density: Optional[float]) -> None:
        source = self.mask if self.block_size is None else self.block_mask
        self._density_hint = (None if density is None else float(density), source._version)

    @property
    def density_hint(self) -> Optional[float]:
        """The host-side kept fraction given with the current mask, or ``None`` if unknown (no sync)."""
        hint, version = getattr(self, "_density_hint", (None, -1))
        source = self.mask if self.block_size is None else self.block_mask
        return hint if version == source._version else None

    @property
    def layout(self) -> BlockLayout:
        """The :class:`BlockLayout`, rebuilt only when ``block_mask`` changed."""
        if self.block_size is None:
            raise AttributeError("layout: this SparseLinear uses an element mask (block_size=None)")
        key = (self.block_mask.data_ptr(), self.block_mask._version, self.block_mask.device)
        if self._layout is None or self._layout_key != key:
            if self._layout is None or self._layout.device != self.block_mask.device:
                self._layout = BlockLayout.from_bitmap(self.block_mask, (self.out_features, self.in_features),
                                                       self.block_size)
            else:
                self._layout.set_bitmap(self.block_mask)
            self._layout_key = key
        return self._layout

    def masked_weight(self) -> torch.Tensor:
        """``W * M`` (detached), cached until the weight or the mask changes, or until it is needed outside
        ``torch.inference_mode`` after being made inside it (an inference tensor cannot be saved for backward)."""
        w = self.weight
        key = (w.data_ptr(), w._version, self.mask.data_ptr(), self.mask._version, w.dtype)
        if (self._masked_weight is None or self._masked_key != key
                or (self._masked_weight.is_inference() and not torch.is_inference_mode_enabled())):
            self._masked_weight = w.detach() * self.mask.to(w.dtype)
            self._masked_key = key
        return self._masked_weight

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # caches keyed on data pointers and versions cannot be traced: build both in the graph
            if self.block_size is not None:
                layout = BlockLayout.from_bitmap(self.block_mask, (self.out_features, self.in_features),
                                                 self.block_size)
                return block_sparse_linear(x, self.weight, layout, self.bias, backend=self.backend)
            return masked_linear(x, self.weight, self.mask, self.bias, backend=self.backend)
        if self.block_size is not None:
            return block_sparse_linear(x, self.weight, self.layout, self.bias, backend=self.backend,
                                       density=self.density_hint)
        return masked_linear(x, self.weight, self.mask, self.bias, backend=self.backend,
                             masked_weight=self.masked_weight())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # ``weight`` is saved as W * M, what the layer computes with: a plain nn.Linear (e.g. transformers'
        # from_pretrained) then loads the pruned model, zeros included. Training checkpoints need the pruned
        # entries too (they can grow back): capsparse.surgery.exact_state_dict sets ``state_dict_exact``.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars and not getattr(self, "state_dict_exact", False):
            destination[prefix + "weight"] = self.weight.detach() * self.element_mask().to(self.weight.dtype)

    def _apply(self, fn, recurse=True):
        # device/dtype moves invalidate the caches; the density hint survives a move
        hint = self.density_hint
        self._layout = self._layout_key = self._masked_weight = self._masked_key = None
        out = super()._apply(fn, recurse)
        self._note_density(hint)
        return out

    def extra_repr(self) -> str:
        kind = "element mask" if self.block_size is None else f"block_size={self.block_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {kind}")
