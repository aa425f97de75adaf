"""Sparsity layouts: block bitmaps with kernel metadata, and element masks.

A :class:`BlockLayout` describes which ``(bm, bk)`` blocks of an ``N x K`` weight are kept and
carries the index metadata the three block-sparse products need (see ``docs/design.md``):
forward walks block-rows, dX walks block-columns, dW walks a flat kept-block list. All metadata
is built with tensor ops on the bitmap's device, with fixed capacity ``R * C`` and no host
synchronisation, so changing the mask while training costs one metadata rebuild.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

BlockSize = Union[int, Tuple[int, int]]


def normalize_block_size(block_size: BlockSize) -> Tuple[int, int]:
    """``32 -> (32, 32)``; validates against :data:`SUPPORTED_BLOCK_SIZES`."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        pair = (block_size[0], block_size[1])
    else:
        raise TypeError(f"block_size: expected an int or a pair (bm, bk) of ints, got {block_size!r}")
    for value in pair:
        if not isinstance(value, int) or value not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size: expected each side in {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    return pair


def check_block_divides(shape: Tuple[int, int], block_size: Tuple[int, int], name: str = "weight") -> None:
    n, k = shape
    bm, bk = block_size
    if n % bm or k % bk:
        raise ValueError(
            f"block_size: {block_size} does not divide {name} of shape ({n}, {k}); "
            f"expected out_features % {bm} == 0 and in_features % {bk} == 0")


def check_block_mask(bitmap, expected: Tuple[int, int], block_size: Tuple[int, int], name: str = "bitmap") -> None:
    """A bool block mask of shape ``expected`` (block-rows x block-columns for ``block_size``)."""
    if not isinstance(bitmap, torch.Tensor) or bitmap.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor of shape {expected} (block mask), got "
                        f"{type(bitmap).__name__} {getattr(bitmap, 'dtype', '')}")
    if tuple(bitmap.shape) != tuple(expected):
        raise ValueError(f"{name}: expected a block mask of shape {tuple(expected)} for block size {block_size}, "
                         f"got {tuple(bitmap.shape)}")


def build_block_metadata(bitmap: torch.Tensor) -> dict:
    """Index metadata for a bool ``[R, C]`` bitmap, with tensor ops only (no ``.item()``).

    A stable sort that puts kept blocks first gives their flat row-major positions; the
    padding past ``nnz`` is zeroed so that kernels never read out of range.
    """
    r, c = bitmap.shape
    device = bitmap.device
    capacity = r * c
    flat = bitmap.reshape(-1)
    nnz = flat.sum()
    valid = torch.arange(capacity, device=device) < nnz

    order = torch.sort((~flat).to(torch.uint8), stable=True).indices  # kept first, row-major
    row_cols = torch.where(valid, order % c, 0).to(torch.int32) if c else order.to(torch.int32)
    block_rows = torch.where(valid, order // c, 0).to(torch.int32) if c else order.to(torch.int32)
    row_ptr = torch.zeros(r + 1, dtype=torch.int32, device=device)
    row_ptr[1:] = bitmap.sum(1).cumsum(0)

    flat_t = bitmap.t().reshape(-1)
    order_t = torch.sort((~flat_t).to(torch.uint8), stable=True).indices  # kept first, column-major
    col_rows = torch.where(valid, order_t % r, 0).to(torch.int32) if r else order_t.to(torch.int32)
    col_ptr = torch.zeros(c + 1, dtype=torch.int32, device=device)
    col_ptr[1:] = bitmap.sum(0).cumsum(0)
    return dict(nnz=nnz, row_ptr=row_ptr, row_cols=row_cols, col_ptr=col_ptr, col_rows=col_rows,
                block_rows=block_rows)


# -- decoding: the one place metadata and block masks become bitmaps and element masks -------------------------

def bitmap_from_compressed(ptr: torch.Tensor, idx: torch.Tensor, n_other: int) -> torch.Tensor:
    """Bool ``[len(ptr) - 1, n_other]`` from compressed (CSR-style) indices: row ``r`` keeps the entries
    ``idx[ptr[r]:ptr[r+1]]``; entries of ``idx`` past ``ptr[-1]`` are padding and ignored.

    Decodes a layout's ``(row_ptr, row_cols)`` (block-rows), ``(col_ptr, col_rows)`` (block-columns: the
    transposed bitmap), a BSR tensor's ``(crow_indices, col_indices)`` or a CSR mask's. Tensor ops only: the
    padding lands in a spare row, so there is no host sync.
    """
    n = ptr.numel() - 1
    capacity = idx.numel()
    counts = torch.cat([ptr.diff(), (capacity - ptr[-1]).reshape(1)]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n + 1, device=ptr.device), counts, output_size=capacity)
    bitmap = torch.zeros(n + 1, n_other, dtype=torch.bool, device=ptr.device)
    bitmap[rows, idx.to(device=ptr.device, dtype=torch.int64)] = True
    return bitmap[:n]


def bitmap_from_blocks(block_rows: torch.Tensor, block_cols: torch.Tensor, nnz, grid: Tuple[int, int]) -> torch.Tensor:
    """Bool ``grid`` bitmap from a flat kept-block list: block ``i < nnz`` is ``(block_rows[i], block_cols[i])``;
    the rest is padding. ``nnz`` may be a 0-dim tensor (no host sync) or an int."""
    r, c = grid
    device = block_rows.device
    valid = torch.arange(block_rows.numel(), device=device) < nnz
    rows = torch.where(valid, block_rows.to(torch.int64), r)  # padding -> spare row
    bitmap = torch.zeros(r + 1, c, dtype=torch.bool, device=device)
    bitmap[rows, block_cols.to(device=device, dtype=torch.int64)] = True
    return bitmap[:r]


def expand_bitmap(bitmap: torch.Tensor, block_size: Tuple[int, int]) -> torch.Tensor:
    """Element mask ``[R * bm, C * bk]`` of a block bitmap ``[R, C]`` (same dtype as ``bitmap``)."""
    bm, bk = block_size
    return bitmap.repeat_interleave(bm, 0).repeat_interleave(bk, 1)


@dataclass
class BlockLayout:
    """Kept blocks of an ``N x K`` weight with block size ``(bm, bk)``, plus kernel metadata.

    Fields follow ``docs/design.md``. ``version`` counts mask changes so that backends can key
    caches (packed weights) on ``(id(layout), layout.version, weight._version)``.
    """

    shape: Tuple[int, int]
    block_size: Tuple[int, int]
    bitmap: torch.Tensor
    nnz: torch.Tensor
    row_ptr: torch.Tensor
    row_cols: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor
    block_rows: torch.Tensor
    version: int = 0

    @property
    def block_cols(self) -> torch.Tensor:
        return self.row_cols

    @property
    def grid(self) -> Tuple[int, int]:
        return self.bitmap.shape[0], self.bitmap.shape[1]

    @property
    def device(self) -> torch.device:
        return self.bitmap.device

    @classmethod
    def from_bitmap(cls, bitmap: torch.Tensor, shape: Tuple[int, int], block_size: BlockSize) -> "BlockLayout":
        bm, bk = normalize_block_size(block_size)
        check_block_divides(tuple(shape), (bm, bk))
        check_block_mask(bitmap, (shape[0] // bm, shape[1] // bk), (bm, bk))
        bitmap = bitmap.contiguous()
        return cls(shape=(int(shape[0]), int(shape[1])), block_size=(bm, bk), bitmap=bitmap,
                   **build_block_metadata(bitmap))

    @classmethod
    def dense(cls, shape, block_size, device=None) -> "BlockLayout":
        bm, bk = normalize_block_size(block_size)
        check_block_divides(tuple(shape), (bm, bk))
        return cls.from_bitmap(torch.ones(shape[0] // bm, shape[1] // bk, dtype=torch.bool, device=device),
                               shape, (bm, bk))

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_size: BlockSize) -> "BlockLayout":
        """A block is kept when any element of it is kept."""
        bm, bk = normalize_block_size(block_size)
        check_block_divides(tuple(mask.shape), (bm, bk), name="mask")
        n, k = mask.shape
        bitmap = mask.reshape(n // bm, bm, k // bk, bk).any(dim=3).any(dim=1)
        return cls.from_bitmap(bitmap, (n, k), (bm, bk))

    def set_bitmap(self, bitmap: torch.Tensor) -> None:
        """Replace the kept blocks in place (same capacity, no reallocation of the layout object)."""
        fresh = BlockLayout.from_bitmap(bitmap.to(self.device), self.shape, self.block_size)
        for name in ("bitmap", "nnz", "row_ptr", "row_cols", "col_ptr", "col_rows", "block_rows"):
            setattr(self, name, getattr(fresh, name))
        self.version += 1

    def to(self, device) -> "BlockLayout":
        out = BlockLayout.from_bitmap(self.bitmap.to(device), self.shape, self.block_size)
        out.version = self.version
        return out

    def to_dense_mask(self) -> torch.Tensor:
        """Element mask ``[N, K]`` (bool) of the kept blocks."""
        return expand_bitmap(self.bitmap, self.block_size)

    def density(self) -> torch.Tensor:
        return self.bitmap.float().mean() if self.bitmap.numel() else torch.tensor(0.0)

    # -- interop -----------------------------------------------------------------------------
    def to_sparse_bsr(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept blocks of ``weight`` as a ``torch.sparse_bsr`` tensor (values copied)."""
        check_weight(weight, self.shape)
        bm, bk = self.block_size
        crow = self.row_ptr.to(torch.int64)
        nnz = int(self.nnz)
        col = self.row_cols[:nnz].to(torch.int64)
        rows = self.block_rows[:nnz].to(torch.int64)
        blocks = weight.reshape(self.shape[0] // bm, bm, self.shape[1] // bk, bk).permute(0, 2, 1, 3)
        values = blocks[rows, col].contiguous()
        return torch.sparse_bsr_tensor(crow, col, values, size=self.shape, dtype=weight.dtype, device=weight.device,
                                       check_invariants=True)

    @classmethod
    def from_sparse_bsr(cls, bsr: torch.Tensor) -> Tuple["BlockLayout", torch.Tensor]:
        """Returns ``(layout, dense_weight)`` from a ``torch.sparse_bsr`` tensor."""
        if bsr.layout != torch.sparse_bsr:
            raise TypeError(f"bsr: expected a torch.sparse_bsr tensor, got layout {bsr.layout}")
        bm, bk = bsr.values().shape[-2:]
        crow, col = bsr.crow_indices(), bsr.col_indices()
        n, k = bsr.shape
        bitmap = bitmap_from_compressed(crow, col, k // bk)
        return cls.from_bitmap(bitmap, (n, k), (int(bm), int(bk))), bsr.to_dense()


def check_weight(weight: torch.Tensor, shape) -> None:
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"weight: expected shape {tuple(shape)}, got {tuple(weight.shape)}")


class ElementMask:
    """An unstructured bool mask ``[N, K]`` with a packed-bits form (8 elements per byte, little-endian
    within a byte, row-major), for storage and the masked-GEMM kernels."""

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask: expected a 2-D bool tensor, got {getattr(mask, 'dtype', type(mask))} "
                            f"with {getattr(mask, 'dim', lambda: '?')()} dims")
        self.mask = mask

    @property
    def shape(self):
        return tuple(self.mask.shape)

    def density(self) -> torch.Tensor:
        return self.mask.float().mean() if self.mask.numel() else torch.tensor(0.0)

    def pack(self) -> torch.Tensor:
        return pack_bits(self.mask)

    @classmethod
    def unpack(cls, bits: torch.Tensor, shape) -> "ElementMask":
        return cls(unpack_bits(bits, shape))

    def to_sparse_csr(self, weight: torch.Tensor) -> torch.Tensor:
        check_weight(weight, self.shape)
        return (weight * self.mask).to_sparse_csr()

    @classmethod
    def from_sparse_csr(cls, csr: torch.Tensor) -> Tuple["ElementMask", torch.Tensor]:
        """Returns ``(mask, dense_weight)``; the mask marks the stored entries."""
        if csr.layout != torch.sparse_csr:
            raise TypeError(f"csr: expected a torch.sparse_csr tensor, got layout {csr.layout}")
        mask = bitmap_from_compressed(csr.crow_indices(), csr.col_indices(), csr.shape[1])
        return cls(mask), csr.to_dense()


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ``ceil(numel / 8)`` bytes (flattened row-major)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= int(s)
    if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"bits: expected {(numel + 7) // 8} uint8 values for shape {tuple(shape)}, "
                         f"got {bits.numel()} {bits.dtype}")
    flat = (bits.reshape(-1, 1) & _BIT_WEIGHTS.to(bits.device)) != 0
    return flat.reshape(-1)[:numel].reshape(tuple(shape))


def kept_count_for_density(numel: int, density: float) -> int:
    """Number of entries kept at ``density`` (rounded down, as the official top-k does)."""
    return int(numel * density)


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask keeping the ``int(numel * density)`` largest scores, with the threshold from
    ``kthvalue`` (one selection, not a full sort). Ties at the threshold are broken by position."""
    check_density(density)
    numel = scores.numel()
    keep = kept_count_for_density(numel, density)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if keep >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    nans = int(torch.isnan(flat).sum()) if flat.is_floating_point() else 0
    if nans:  # kthvalue would return NaN and every comparison below False: an empty mask, silently
        raise ValueError(f"scores: expected no NaN entries, got {nans} of {numel}")
    threshold = torch.kthvalue(flat.float(), numel - keep + 1).values
    above = flat > threshold
    ties = flat == threshold
    # exactly `keep` entries: all strictly above, then the first ties by position
    need = keep - above.sum()
    tie_rank = torch.cumsum(ties.to(torch.int64), 0)
    mask = above | (ties & (tie_rank <= need))
    return mask.reshape(scores.shape)


def check_density(density: float, name: str = "density") -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not (0.0 <= float(density) <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {density!r}")


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1), got {sparsity!r}")
