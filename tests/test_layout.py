"""BlockLayout metadata, element masks, packing and BSR/CSR interop."""
import pytest
import torch

from capsparse.layout import (BlockLayout, ElementMask, bitmap_from_blocks, bitmap_from_compressed, expand_bitmap,
                              normalize_block_size, pack_bits, topk_mask, unpack_bits)
from _grid import python_metadata, random_bitmap


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (5, 4), (8, 8), (3, 12)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 0.7, 1.0])
def test_metadata_matches_python_construction(grid, density):
    bitmap = random_bitmap(grid, density, torch.Generator().manual_seed(grid[0] * 7 + grid[1]))
    layout = BlockLayout.from_bitmap(bitmap, (grid[0] * 16, grid[1] * 32), (16, 32))
    want = python_metadata(bitmap)
    nnz = want["nnz"]
    row_ptr, col_ptr = want["row_ptr"], want["col_ptr"]
    row_cols, col_rows, block_rows = (want[n][:nnz] for n in ("row_cols", "col_rows", "block_rows"))
    capacity = grid[0] * grid[1]
    assert int(layout.nnz) == nnz
    assert layout.row_ptr.tolist() == row_ptr and layout.col_ptr.tolist() == col_ptr
    assert layout.row_cols[:nnz].tolist() == row_cols and layout.block_rows[:nnz].tolist() == block_rows
    assert layout.col_rows[:nnz].tolist() == col_rows
    # fixed capacity, zero padding: kernels never index out of range
    for name in ("row_cols", "col_rows", "block_rows"):
        t = getattr(layout, name)
        assert t.numel() == capacity and t.dtype == torch.int32
        assert (t[nnz:] == 0).all()
    assert layout.block_cols is layout.row_cols


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (5, 4), (3, 12)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_the_one_decoder_gives_back_the_bitmap(grid, density):
    """Every metadata form a backend reads (block-rows, block-columns, the flat list with a tensor or an int
    nnz) decodes to the bitmap it was built from, the zero padding past nnz ignored; expand_bitmap is the
    element mask."""
    bitmap = random_bitmap(grid, density, torch.Generator().manual_seed(grid[0] * 5 + grid[1]))
    if 0 < density < 1:  # a padded tail that must be ignored
        bitmap[0, 0], bitmap[-1, -1] = True, False
    layout = BlockLayout.from_bitmap(bitmap, (grid[0] * 16, grid[1] * 32), (16, 32))
    r, c = grid
    assert torch.equal(bitmap_from_compressed(layout.row_ptr, layout.row_cols, c), bitmap)
    assert torch.equal(bitmap_from_compressed(layout.col_ptr, layout.col_rows, r), bitmap.t())
    assert torch.equal(bitmap_from_blocks(layout.block_rows, layout.block_cols, layout.nnz, grid), bitmap)
    assert torch.equal(bitmap_from_blocks(layout.block_rows, layout.block_cols, int(layout.nnz), grid), bitmap)
    dense = expand_bitmap(bitmap, (16, 32))
    assert dense.shape == (r * 16, c * 32) and torch.equal(dense, layout.to_dense_mask())
    assert torch.equal(dense[::16, ::32], bitmap) and int(dense.sum()) == int(bitmap.sum()) * 16 * 32


def test_decoder_puts_padding_nowhere():
    """A padded tail of non-zero indices (the decoder must not trust padding to be 0) sets no entry."""
    ptr = torch.tensor([0, 1, 1], dtype=torch.int32)
    idx = torch.tensor([2, 1, 2, 0, 0, 0], dtype=torch.int32)  # one kept entry, five padding
    assert bitmap_from_compressed(ptr, idx, 3).tolist() == [[False, False, True], [False, False, False]]
    rows, cols = torch.tensor([1, 0, 1], dtype=torch.int32), torch.tensor([0, 2, 2], dtype=torch.int32)
    assert bitmap_from_blocks(rows, cols, torch.tensor(1), (2, 3)).tolist() == [[False] * 3, [True, False, False]]


def test_set_bitmap_rebuilds_in_place_and_counts_versions():
    layout = BlockLayout.dense((64, 64), 32)
    new = torch.tensor([[True, False], [False, False]])
    layout.set_bitmap(new)
    assert layout.version == 1 and int(layout.nnz) == 1 and layout.row_ptr.tolist() == [0, 1, 1]
    assert torch.equal(layout.to_dense_mask()[:32, :32], torch.ones(32, 32, dtype=torch.bool))
    assert int(layout.to_dense_mask().sum()) == 32 * 32


def test_from_dense_mask_keeps_any_touched_block():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[40, 3] = True
    layout = BlockLayout.from_dense_mask(mask, 32)
    assert layout.bitmap.tolist() == [[False, False], [True, False]]


@pytest.mark.parametrize("block", [16, 32, (16, 32)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_bsr_round_trip(block, density):
    bm, bk = normalize_block_size(block)
    shape = (bm * 3, bk * 2)
    layout = BlockLayout.from_bitmap(random_bitmap((3, 2), density, torch.Generator().manual_seed(1)), shape, block)
    weight = torch.randn(shape)
    bsr = layout.to_sparse_bsr(weight)
    assert bsr.layout == torch.sparse_bsr
    assert torch.equal(bsr.to_dense(), weight * layout.to_dense_mask())
    back, dense = BlockLayout.from_sparse_bsr(bsr)
    assert torch.equal(back.bitmap, layout.bitmap) and back.block_size == (bm, bk)
    assert torch.equal(dense, weight * layout.to_dense_mask())


def test_csr_round_trip_and_packed_bits():
    mask = torch.rand(13, 7) < 0.4
    weight = torch.randn(13, 7) + 5.0  # no accidental zeros among kept entries
    em = ElementMask(mask)
    csr = em.to_sparse_csr(weight)
    back, dense = ElementMask.from_sparse_csr(csr)
    assert torch.equal(back.mask, mask) and torch.equal(dense, weight * mask)
    bits = em.pack()
    assert bits.dtype == torch.uint8 and bits.numel() == (13 * 7 + 7) // 8
    assert torch.equal(unpack_bits(bits, (13, 7)), mask)
    assert torch.equal(pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True])),
                       torch.tensor([1, 1], dtype=torch.uint8))


@pytest.mark.parametrize("density", [0.0, 0.03, 0.1, 0.5, 1.0])
def test_topk_mask_keeps_exact_count_even_with_ties(density):
    scores = torch.randint(0, 5, (37, 29)).float()  # many ties
    mask = topk_mask(scores, density)
    keep = int(scores.numel() * density)
    assert int(mask.sum()) == keep
    if 0 < keep < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


def test_topk_mask_refuses_nan_scores():
    scores = torch.randn(8, 8)
    scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match="scores: expected no NaN entries, got 1 of 64"):
        topk_mask(scores, 0.5)


@pytest.mark.parametrize("bad, exc, words", [
    (24, ValueError, "block_size"), ((32,), TypeError, "block_size"), ("32", TypeError, "block_size"),
    ((32, 48), ValueError, "block_size"), (True, TypeError, "block_size"),
])
def test_bad_block_sizes(bad, exc, words):
    with pytest.raises(exc, match=words):
        normalize_block_size(bad)


def test_bad_layout_inputs():
    with pytest.raises(ValueError, match="does not divide"):
        BlockLayout.dense((48, 64), 32)
    with pytest.raises(ValueError, match=r"bitmap: expected a block mask of shape \(2, 2\)"):
        BlockLayout.from_bitmap(torch.ones(2, 3, dtype=torch.bool), (64, 64), 32)
    with pytest.raises(TypeError, match="bitmap: expected a bool tensor"):
        BlockLayout.from_bitmap(torch.ones(2, 2), (64, 64), 32)
    with pytest.raises(ValueError, match="density"):
        topk_mask(torch.randn(4), 1.5)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (5, 5))
    with pytest.raises(TypeError, match="mask"):
        ElementMask(torch.ones(3, 3))
