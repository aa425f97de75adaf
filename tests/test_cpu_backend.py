"""The ``cpu`` backend (``capsparse._C``) against plain torch references.

These tests never skip: if the extension is not built they fail and say how to build it.
"""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F

from capsparse.backends import cpu
from capsparse.layout import build_block_metadata


@pytest.fixture(autouse=True)
def _extension_built():
    ok, reason = cpu.is_available()
    if not ok:
        pytest.fail(f"the cpu backend is unavailable: {reason}", pytrace=False)


@pytest.fixture
def threads():
    """Restore the thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# metadata (contract of docs/design.md)
# ------------------------------------------------------------------------------------------------
def meta(bitmap: torch.Tensor):
    """Block-layout metadata of docs/design.md (capsparse.layout's builder, itself tested against a
    plain-Python construction in test_layout.py)."""
    m = build_block_metadata(bitmap)
    m["block_cols"] = m["row_cols"]
    return m


def make_bitmap(r, c, density, gen, holes=False):
    if density >= 1:
        b = torch.ones(r, c, dtype=torch.bool)
    else:
        b = torch.rand(r, c, generator=gen) < density
    if holes and r > 1 and c > 1:  # hand-made empty block-row and block-column, and one full row
        b[0] = False
        b[:, -1] = False
        b[-1, :-1] = True
    return b


def expand(bitmap, bm, bk):
    return bitmap.repeat_interleave(bm, 0).repeat_interleave(bk, 1)


def tol_check(got, ref64, torch_fp32, floor=1e-5):
    """|got - ref| <= 2 * |torch fp32 - ref| + floor * scale (fp32), elementwise max-norm."""
    scale = ref64.abs().max().item() + 1.0
    err = (got.double() - ref64).abs().max().item()
    base = (torch_fp32.double() - ref64).abs().max().item()
    assert err <= 2 * base + floor * scale, f"err {err:.3g} vs torch fp32 err {base:.3g} (scale {scale:.3g})"


SHAPES = [(64, 96), (128, 64), (96, 96), (192, 128)]  # (N, K): out x in, non-square included
BLOCKS = [(16, 16), (32, 32), (64, 64), (16, 32), (32, 16), (64, 32)]
DENSITIES = [0.0, 0.03, 0.1, 0.5, 1.0]
TOKENS = [1, 37, 64, 200]


def cases():
    for (n, k), (bm, bk), d in itertools.product(SHAPES, BLOCKS, DENSITIES):
        if n % bm == 0 and k % bk == 0:
            yield n, k, bm, bk, d


@pytest.mark.parametrize("n,k,bm,bk,density", list(cases()))
def test_bsl_fp32_against_fp64_reference(n, k, bm, bk, density):
    gen = torch.Generator().manual_seed(n * 1000 + k + bm + 7 * bk + int(density * 100))
    for holes in (False, True):
        bitmap = make_bitmap(n // bm, k // bk, density, gen, holes=holes)
        md = meta(bitmap)
        mask = expand(bitmap, bm, bk)
        w = torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen)
        w64, b64, m64 = w.double(), b.double(), mask.double()
        for t in TOKENS:
            x = torch.randn(t, k, generator=gen)
            gy = torch.randn(t, n, generator=gen)
            x64, gy64 = x.double(), gy.double()
            # forward, with and without bias
            y = cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk)
            tol_check(y, F.linear(x64, w64 * m64, b64), F.linear(x, w * mask, b))
            y0 = cpu.bsl_forward(x, w, None, md["row_ptr"], md["row_cols"], bm, bk)
            tol_check(y0, F.linear(x64, w64 * m64), F.linear(x, w * mask))
            # dX
            gx = cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk)
            tol_check(gx, gy64 @ (w64 * m64), gy @ (w * mask))
            # dW: kept blocks only, exact zeros elsewhere
            gw = cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], bm, bk)
            tol_check(gw, (gy64.t() @ x64) * m64, (gy.t() @ x) * mask)
            assert torch.all(gw[~mask] == 0)
            assert y.dtype == gx.dtype == gw.dtype == torch.float32


@pytest.mark.parametrize("bm,bk", [(16, 16), (32, 32), (16, 32), (24, 8), (64, 64)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_bsl_fp64_exact(bm, bk, density):
    n, k = 192, 128
    gen = torch.Generator().manual_seed(bm * 31 + bk + int(100 * density))
    bitmap = make_bitmap(n // bm, k // bk, density, gen, holes=True)
    md = meta(bitmap)
    mask = expand(bitmap, bm, bk).double()
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    for t in (1, 37, 200):
        x = torch.randn(t, k, generator=gen, dtype=torch.float64)
        gy = torch.randn(t, n, generator=gen, dtype=torch.float64)
        y = cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk)
        torch.testing.assert_close(y, F.linear(x, w * mask, b), rtol=1e-12, atol=1e-12)
        gx = cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk)
        torch.testing.assert_close(gx, gy @ (w * mask), rtol=1e-12, atol=1e-12)
        gw = cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], bm, bk)
        torch.testing.assert_close(gw, (gy.t() @ x) * mask, rtol=1e-12, atol=1e-12)
        assert torch.all(gw[mask == 0] == 0)


def test_bsl_gradcheck_fp64():
    n, k, bm, bk = 32, 48, 16, 16
    gen = torch.Generator().manual_seed(3)
    bitmap = make_bitmap(n // bm, k // bk, 0.5, gen, holes=True)
    md = meta(bitmap)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk)

        @staticmethod
        def backward(ctx, gy):
            x, w = ctx.saved_tensors
            gy = gy.contiguous()
            return (cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk),
                    cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], bm, bk),
                    gy.sum(0))

    x = torch.randn(5, k, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, generator=gen, requires_grad=True)
    # the masked-out weight entries have zero gradient: perturb only kept ones by masking in the fn
    mask = expand(bitmap, bm, bk).double()
    assert torch.autograd.gradcheck(lambda x_, w_, b_: Fn.apply(x_, w_ * mask + w_.detach() * (1 - mask), b_),
                                    (x, w, b))


def test_bsl_batch_dims_flattened():
    gen = torch.Generator().manual_seed(5)
    n, k, bm, bk = 128, 64, 32, 32
    bitmap = make_bitmap(n // bm, k // bk, 0.5, gen)
    md = meta(bitmap)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(3, 7, k, generator=gen)
    y = cpu.bsl_forward(x.reshape(-1, k), w, None, md["row_ptr"], md["row_cols"], bm, bk).reshape(3, 7, n)
    ref = F.linear(x.double(), w.double() * expand(bitmap, bm, bk).double())
    tol_check(y, ref, F.linear(x, w * expand(bitmap, bm, bk)))


def test_bsl_out_argument_and_low_precision():
    gen = torch.Generator().manual_seed(6)
    n, k, bm, bk, t = 128, 96, 32, 32, 50
    bitmap = make_bitmap(n // bm, k // bk, 0.5, gen)
    md = meta(bitmap)
    w, b, x = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), torch.randn(t, k, generator=gen)
    out = torch.full((t, n), float("nan"))
    y = cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(out, cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk))
    gy = torch.randn(t, n, generator=gen)
    gout = torch.full((t, k), float("nan"))
    gx = cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk, out=gout)
    assert gx.data_ptr() == gout.data_ptr()
    assert torch.equal(gout, cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk))
    with pytest.raises(RuntimeError):
        cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk, out=torch.empty(t, n + 1))
    # bf16 is computed in fp32 and rounded
    mask = expand(bitmap, bm, bk)
    yb = cpu.bsl_forward(x.bfloat16(), w.bfloat16(), b.bfloat16(), md["row_ptr"], md["row_cols"], bm, bk)
    assert yb.dtype == torch.bfloat16
    ref = F.linear(x.bfloat16().float(), w.bfloat16().float() * mask, b.bfloat16().float())
    torch.testing.assert_close(yb.float(), ref, rtol=2e-2, atol=2e-2)


def test_bsl_dense_fallback(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    n, k, bm, bk, t = 128, 96, 32, 32, 40
    bitmap = make_bitmap(n // bm, k // bk, 0.5, gen, holes=True)
    md = meta(bitmap)
    mask = expand(bitmap, bm, bk)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    x, gy = torch.randn(t, k, generator=gen), torch.randn(t, n, generator=gen)
    monkeypatch.setenv("CAPSPARSE_CPU_DENSE_ABOVE", "0")
    y = cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk)
    tol_check(y, F.linear(x.double(), w.double() * mask, b.double()), F.linear(x, w * mask, b))
    out = torch.empty(t, n)
    cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk, out=out)
    assert torch.equal(out, y)
    gx = cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk)
    tol_check(gx, gy.double() @ (w.double() * mask), gy @ (w * mask))


@pytest.mark.parametrize("bm,bk", [(16, 16), (32, 32), (64, 64), (32, 16), (24, 8)])
def test_bsl_thread_count_independent(threads, bm, bk):
    gen = torch.Generator().manual_seed(11)
    n, k = 384, 256
    bitmap = make_bitmap(n // bm, k // bk, 0.3, gen, holes=True)
    bitmap[1] = True  # unbalanced block-rows
    md = meta(bitmap)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    results = []
    for t in (37, 700):
        x, gy = torch.randn(t, k, generator=gen), torch.randn(t, n, generator=gen)
        per_threads = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            per_threads.append((cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk),
                                cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk),
                                cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], bm, bk)))
        results.append(per_threads)
    for per_threads in results:
        for other in per_threads[1:]:
            for a, c in zip(per_threads[0], other):
                assert torch.equal(a, c)



@pytest.fixture
def default_tuning():
    """Restore the automatic kernel tuning after a test that changes it."""
    yield
    cpu.set_tuning()


@pytest.mark.parametrize("bm,bk", [(32, 32), (64, 64), (32, 16), (16, 32), (64, 32)])
def test_bsl_strip_width_does_not_change_results(default_tuning, monkeypatch, bm, bk):
    """The wide 32-column weight strip (AVX-512 builds) and the 16-column one run the same multiply-add
    chains in the same order: forward, dX and dW agree bitwise, through the op and through SparseLinear."""
    from capsparse.nn import SparseLinear

    monkeypatch.setenv("CAPSPARSE_CPU_DENSE_ABOVE", "1.01")  # the sparse kernels at every density
    gen = torch.Generator().manual_seed(bm + 3 * bk)
    n, k = 192, 128
    bitmap = make_bitmap(n // bm, k // bk, 0.4, gen, holes=True)
    md = meta(bitmap)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    x, gy = torch.randn(53, k, generator=gen), torch.randn(53, n, generator=gen)
    layer = SparseLinear(k, n, block_size=(bm, bk))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        layer.set_mask(bitmap)

    def run():
        ops = (cpu.bsl_forward(x, w, b, md["row_ptr"], md["row_cols"], bm, bk),
               cpu.bsl_grad_input(gy, w, md["col_ptr"], md["col_rows"], bm, bk),
               cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], bm, bk))
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        layer(xr).backward(gy)
        return ops + (xr.grad, layer.weight.grad)

    cpu.set_tuning(strip=16)
    narrow = run()
    cpu.set_tuning(strip=0)
    automatic = run()
    for a, c in zip(narrow, automatic):
        assert torch.equal(a, c)


@pytest.mark.parametrize("bm,bk", [(32, 32), (16, 32), (64, 64)])
def test_bsl_grad_weight_token_chunk_does_not_change_results(default_tuning, bm, bk):
    """dW's token chunk only decides where the running sums wait in memory: bitwise the same sums."""
    gen = torch.Generator().manual_seed(5 * bm + bk)
    n, k, t = 192, 128, 300
    md = meta(make_bitmap(n // bm, k // bk, 0.3, gen, holes=True))
    x, gy = torch.randn(t, k, generator=gen), torch.randn(t, n, generator=gen)
    results = []
    for chunk in (0, 64, 128, 256, 1000):
        cpu.set_tuning(dw_chunk=chunk)
        results.append(cpu.bsl_grad_weight(gy, x, md["block_rows"], md["block_cols"], md["nnz"], bm, bk))
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_set_tuning_rejects_a_bad_strip_width(default_tuning):
    with pytest.raises(RuntimeError, match="strip must be 0"):
        cpu.set_tuning(strip=24)


def test_masked_linear_forward():
    x, w, b = torch.randn(9, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(cpu.masked_linear_forward(x, w, b), F.linear(x, w, b))


# ------------------------------------------------------------------------------------------------
# element-sparse (CSR) linear, inference
# ------------------------------------------------------------------------------------------------
def sparse_weight(n, k, density, gen, dtype=torch.float32):
    w = torch.randn(n, k, generator=gen)
    if density < 1:
        w = w * (torch.rand(n, k, generator=gen) < density)
    if n > 2 and 0 < density < 1:
        w[1] = 0  # an empty row
        w[2] = torch.randn(k, generator=gen)  # a full row
    return w.to(dtype)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (16, 64), (37, 100), (130, 48), (384, 257)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("t", [1, 7, 64, 129])
def test_csr_linear_fp32_against_fp64_reference(n, k, density, t):
    gen = torch.Generator().manual_seed(n * 31 + k + t)
    w, b = sparse_weight(n, k, density, gen), torch.randn(n, generator=gen)
    x = torch.randn(t, k, generator=gen)
    csr = cpu.csr_from_dense(w)
    assert csr.values.numel() == int((w != 0).sum()) and csr.row_ptr[-1] == csr.values.numel()
    y = cpu.csr_linear(x, csr, b)
    tol_check(y, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))
    assert torch.equal(cpu.csr_linear_reference(torch.eye(k), csr).t(), w)  # the reference rebuilds W exactly
    tol_check(cpu.csr_linear(x, csr), F.linear(x.double(), w.double()), F.linear(x, w))  # no bias


@pytest.fixture
def default_csr_tuning():
    yield
    cpu.set_csr_tuning()


@pytest.mark.parametrize("n,k,t", [(384, 1536, 77), (1536, 384, 130), (37, 100, 5), (130, 48, 64)])
def test_csr_linear_tuning_does_not_change_results(default_csr_tuning, n, k, t):
    """Token tile, column chunk and rows-at-a-time only reorder independent work: every output element is
    the same multiply-add chain in CSR order, so the results agree bitwise (several chunks included)."""
    gen = torch.Generator().manual_seed(n + k + t)
    w, b = sparse_weight(n, k, 0.1, gen), torch.randn(n, generator=gen)
    x = torch.randn(t, k, generator=gen)
    csr = cpu.csr_from_dense(w)
    cpu.set_csr_tuning(64, 48 << 10, 1)
    base = cpu.csr_linear(x, csr, b)
    tol_check(base, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))
    for tile, chunk, rows in itertools.product((32, 64, 128), (0, 2 << 10, 24 << 10), (0, 1, 2, 4)):
        cpu.set_csr_tuning(tile, chunk, rows)
        assert torch.equal(cpu.csr_linear(x, csr, b), base), (tile, chunk, rows)


def test_set_csr_tuning_rejects_bad_values(default_csr_tuning):
    with pytest.raises(RuntimeError, match="tile must be"):
        cpu.set_csr_tuning(tile=48)
    with pytest.raises(RuntimeError, match="rows must be"):
        cpu.set_csr_tuning(rows=3)
    with pytest.raises(RuntimeError, match="chunk_bytes must be"):
        cpu.set_csr_tuning(chunk_bytes=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_csr_linear_low_precision(dtype):
    gen = torch.Generator().manual_seed(3)
    n, k, t = 96, 80, 70
    w, b = sparse_weight(n, k, 0.2, gen, dtype), torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(2, t // 2, k, generator=gen).to(dtype)  # leading dims are flattened
    csr = cpu.csr_from_dense(w)
    y = cpu.csr_linear(x, csr, b)
    assert y.dtype == dtype and y.shape == (2, t // 2, n)
    ref = cpu.csr_linear_reference(x, csr, b)
    exact = F.linear(x.double(), w.double(), b.double())
    assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6


def test_csr_linear_thread_count_independent(threads):
    gen = torch.Generator().manual_seed(5)
    w, b = sparse_weight(200, 300, 0.1, gen), torch.randn(200, generator=gen)
    csr = cpu.csr_from_dense(w)
    for t in (5, 64, 700):
        x = torch.randn(t, 300, generator=gen)
        got = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            got.append(cpu.csr_linear(x, csr, b))
        assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_csr_bad_input():
    csr = cpu.csr_from_dense(torch.eye(4))
    with pytest.raises(ValueError, match="expected 4 features"):
        cpu.csr_linear(torch.randn(2, 5), csr)
    with pytest.raises(TypeError, match="x: expected"):
        cpu.csr_linear(torch.randn(2, 4, dtype=torch.float64), csr)
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        cpu.csr_from_dense(torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        cpu.csr_from_dense(torch.ones(2, 2, dtype=torch.int64))


def test_masked_linear_forward_uses_csr_below_the_crossover(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    w, b, x = sparse_weight(64, 48, 0.1, gen), torch.randn(64, generator=gen), torch.randn(33, 48, generator=gen)
    calls = []
    real = cpu.csr_linear
    monkeypatch.setattr(cpu, "csr_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("CAPSPARSE_CPU_CSR_BELOW", "0.5")
    y = cpu.masked_linear_forward(x, w, b)
    tol_check(y, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))
    assert calls == [1]
    cpu.masked_linear_forward(x, w, b)  # cached compressed copy
    assert cpu._CSR_CACHE[w][1] is not None and len(calls) == 2
    with torch.no_grad():
        w.mul_(2)  # an in-place change of W * M invalidates the cached copy
    tol_check(cpu.masked_linear_forward(x, w, b), F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))
    monkeypatch.setenv("CAPSPARSE_CPU_CSR_BELOW", "0.05")  # too dense now: dense F.linear
    w2 = w.clone()
    assert torch.equal(cpu.masked_linear_forward(x, w2, b), F.linear(x, w2, b)) and len(calls) == 3
    assert torch.equal(cpu.masked_linear_forward(x.double(), w2.double(), b.double()),
                       F.linear(x.double(), w2.double(), b.double()))  # fp64: always dense


# ------------------------------------------------------------------------------------------------
# CAP contrastive loss
# ------------------------------------------------------------------------------------------------
def contrastive_reference(q, k, qid, kid, qlab, klab, excl, tau, normalization):
    """Direct transcription of docs/design.md with B x K tensors (autograd gives the grads)."""
    s = q @ k.t() / tau
    b, nk = s.shape
    keep = torch.ones(b, nk, dtype=torch.bool)
    for i in range(b):
        if excl[i] >= 0:
            keep[i, excl[i]] = False
    lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    logp = s - lse

    def loss(pos):
        pos = pos & keep
        cnt = pos.sum(1)
        row = torch.where(pos, logp, torch.zeros_like(logp)).sum(1)
        row = torch.where(cnt > 0, row / cnt.clamp(min=1), torch.zeros_like(row))
        if normalization == "official":
            z = cnt.sum()
        else:
            z = (cnt > 0).sum()
        return -row.sum() / z if z > 0 else (row * 0).sum()

    lu = loss(qid[:, None] == kid[None, :])
    ls = loss(qlab[:, None] == klab[None, :]) if qlab is not None and klab is not None else None
    return lu, ls


def contrastive_case(b, nk, d, dtype, gen, labels=True):
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    k = F.normalize(torch.randn(nk, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    kid = torch.randint(0, max(nk // 3, 1), (nk,), generator=gen)  # duplicates
    qid = torch.randint(0, max(nk // 3, 1) + 4, (b,), generator=gen)  # some rows with no positive
    excl = torch.full((b,), -1, dtype=torch.int64)
    # a query excluded from its own (only) positive key, and a few random exclusions
    if b > 2 and nk > 2:
        qid[0] = 10_000
        kid[1] = 10_000
        excl[0] = 1
        excl[1] = 0
        excl[2] = nk - 1
    qlab = torch.randint(0, 3, (b,), generator=gen) if labels else None
    klab = torch.randint(0, 3, (nk,), generator=gen) if labels else None
    if labels and b > 3:
        qlab[3] = 99  # a label nobody has
    return q, k, qid, kid, qlab, klab, excl


@pytest.mark.parametrize("normalization", ["official", "supcon"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,nk,d,labels", [(8, 20, 16, True), (37, 300, 64, True), (5, 3, 7, False),
                                           (64, 257, 33, True), (1, 1, 8, True)])
def test_cap_contrastive_matches_reference(normalization, dtype, b, nk, d, labels):
    gen = torch.Generator().manual_seed(b * 7 + nk + d)
    q, k, qid, kid, qlab, klab, excl = contrastive_case(b, nk, d, dtype, gen, labels)
    tau = 0.07
    lu, ls, gu, gs = cpu.cap_contrastive(q, k, qid, kid, qlab, klab, excl, tau, normalization)
    q64 = q.double().requires_grad_(True)
    ru, rs = contrastive_reference(q64, k.double(), qid, kid, qlab, klab, excl, tau, normalization)
    (gu_ref,) = torch.autograd.grad(ru, q64, retain_graph=True, allow_unused=True)
    gu_ref = torch.zeros_like(q64) if gu_ref is None else gu_ref
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)
    assert lu.dtype == torch.float32 and lu.dim() == 0
    assert gu.dtype == dtype and gu.shape == q.shape
    torch.testing.assert_close(lu.double(), ru.detach(), rtol=max(rtol, 1e-6), atol=max(atol, 1e-6))
    torch.testing.assert_close(gu.double(), gu_ref, rtol=rtol, atol=atol * 10)
    if labels:
        (gs_ref,) = torch.autograd.grad(rs, q64, allow_unused=True)
        gs_ref = torch.zeros_like(q64) if gs_ref is None else gs_ref
        torch.testing.assert_close(ls.double(), rs.detach(), rtol=max(rtol, 1e-6), atol=max(atol, 1e-6))
        torch.testing.assert_close(gs.double(), gs_ref, rtol=rtol, atol=atol * 10)
    else:
        assert ls is None and gs is None


def test_cap_contrastive_no_positive_anywhere():
    q = F.normalize(torch.randn(4, 8), dim=1)
    k = F.normalize(torch.randn(6, 8), dim=1)
    qid, kid = torch.arange(4) + 100, torch.arange(6)
    excl = torch.full((4,), -1, dtype=torch.int64)
    for norm in ("official", "supcon"):
        lu, ls, gu, gs = cpu.cap_contrastive(q, k, qid, kid, None, None, excl, 0.1, norm)
        assert lu.item() == 0.0 and torch.count_nonzero(gu) == 0 and ls is None and gs is None


def test_cap_contrastive_matches_reference_backend():
    from capsparse.backends import reference
    gen = torch.Generator().manual_seed(21)
    q, k, qid, kid, qlab, klab, excl = contrastive_case(16, 64, 32, torch.float64, gen)
    for norm in ("official", "supcon"):
        ours = cpu.cap_contrastive(q, k, qid, kid, qlab, klab, excl, 0.2, norm)
        ref = reference.cap_contrastive(q, k, qid, kid, qlab, klab, excl, 0.2, norm)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-7)


def test_cap_contrastive_thread_count_independent(threads):
    gen = torch.Generator().manual_seed(4)
    q, k, qid, kid, qlab, klab, excl = contrastive_case(61, 700, 48, torch.float32, gen)
    outs = []
    for nt in (1, 2, 3):
        torch.set_num_threads(nt)
        outs.append(cpu.cap_contrastive(q, k, qid, kid, qlab, klab, excl, 0.05, "official"))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_benchmark_tiny_config(tmp_path):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--tiny", "--output-dir", str(tmp_path), "--no-plot"])
    assert rows and all(r["ms"] > 0 for r in rows)
    assert (tmp_path / "cpu_kernels.csv").exists() and (tmp_path / "cpu_kernels.json").exists()


def test_configure_allocator_rejects_bad_values_and_records_what_it_applied():
    from capsparse.backends import cpu
    with pytest.raises(ValueError, match="mmap_threshold"):
        cpu.configure_allocator(mmap_threshold=-1)
    with pytest.raises(ValueError, match="trim_threshold"):
        cpu.configure_allocator(trim_threshold=2 ** 40)
    got = cpu.configure_allocator()
    if not sys.platform.startswith("linux"):
        assert got["applied"] is False and "glibc" in got["reason"]
        return
    assert got == {"applied": True, "mmap_threshold": 1 << 30, "trim_threshold": 2 ** 31 - 1}
    assert cpu.allocator_state() == got
    x = torch.ones(4096, 3072)  # a freed large block is reused from the heap; results are unaffected
    del x
    assert torch.zeros(4096, 3072).sum() == 0


# ------------------------------------------------------------------------------------------------
# bias gradient (bsl_grad_bias: grad_y summed over tokens)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,n", [(0, 24), (1, 7), (37, 24), (300, 1000), (4100, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bsl_grad_bias_matches_sum(t, n, dtype):
    gen = torch.Generator().manual_seed(t + n)
    gy = torch.randn(t, n, generator=gen, dtype=dtype)
    got = cpu.bsl_grad_bias(gy)
    ref64 = gy.double().sum(0)
    assert got.dtype == dtype and got.shape == (n,)
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref64, rtol=0, atol=1e-12 * max(t, 1))
    else:
        tol_check(got, ref64, gy.sum(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bsl_grad_bias_low_precision(dtype):
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(200, 48, generator=gen).to(dtype)
    got = cpu.bsl_grad_bias(gy)
    assert got.dtype == dtype
    torch.testing.assert_close(got, gy.float().sum(0).to(dtype))  # within one rounding of the fp32 sum


def test_bsl_grad_bias_thread_count_independent(threads):
    gen = torch.Generator().manual_seed(5)
    gy = torch.randn(3000, 1000, generator=gen)  # above the one-thread cutoff, ragged column split
    per_threads = []
    for nt in (1, 2, 3):
        torch.set_num_threads(nt)
        per_threads.append(cpu.bsl_grad_bias(gy))
    for other in per_threads[1:]:
        assert torch.equal(per_threads[0], other)


def test_bsl_grad_bias_rejects_bad_input():
    with pytest.raises(RuntimeError, match="grad_y must be 2-D"):
        cpu.bsl_grad_bias(torch.randn(4, 3, 2))
