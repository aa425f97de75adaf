"""Shared helpers for op tests: random layouts and error-relative tolerances."""
from __future__ import annotations

import torch

from capsparse.layout import BlockLayout


def random_bitmap(grid, density, generator=None, device="cpu"):
    r, c = grid
    if density >= 1.0:
        return torch.ones(r, c, dtype=torch.bool, device=device)
    if density <= 0.0:
        return torch.zeros(r, c, dtype=torch.bool, device=device)
    bitmap = torch.rand(r, c, generator=generator) < density
    return bitmap.to(device)


def random_layout(shape, block_size, density, seed=0, empty_row=False, empty_col=False):
    bm, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    g = torch.Generator().manual_seed(seed)
    bitmap = random_bitmap((shape[0] // bm, shape[1] // bk), density, g)
    if empty_row:
        bitmap[0] = False
    if empty_col:
        bitmap[:, -1] = False
    return BlockLayout.from_bitmap(bitmap, shape, (bm, bk))


def max_rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def assert_within_torch_error(candidate, torch_same_dtype, fp64_reference, floor, name=""):
    """``|candidate - ref64| <= 2 * |torch_same_dtype - ref64| + floor`` in max norm: tolerances that can fail."""
    ref = fp64_reference.double()
    err = (candidate.double() - ref).abs().max().item()
    base = (torch_same_dtype.double() - ref).abs().max().item()
    scale = ref.abs().max().clamp(min=1.0).item()
    bound = 2.0 * base + floor * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch same-dtype error {base:.3e})"


def python_metadata(bitmap):
    """The design.md metadata built with plain Python loops (padded to capacity): the oracle for the tensor build."""
    rows, cols = bitmap.shape
    b = bitmap.tolist()
    row_ptr, row_cols, block_rows = [0], [], []
    for r in range(rows):
        for c in range(cols):
            if b[r][c]:
                row_cols.append(c)
                block_rows.append(r)
        row_ptr.append(len(row_cols))
    col_ptr, col_rows = [0], []
    for c in range(cols):
        for r in range(rows):
            if b[r][c]:
                col_rows.append(r)
        col_ptr.append(len(col_rows))
    pad = rows * cols
    return dict(nnz=len(row_cols), row_ptr=row_ptr, row_cols=row_cols + [0] * (pad - len(row_cols)),
                col_ptr=col_ptr, col_rows=col_rows + [0] * (pad - len(col_rows)),
                block_rows=block_rows + [0] * (pad - len(block_rows)))
