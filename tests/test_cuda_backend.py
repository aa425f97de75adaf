"""GPU checks of the hand-written CUDA kernels (capsparse._C_cuda) against pure-torch references.

Nothing here has been run yet: the development machine has no GPU (see docs/cuda.md). Run on the
first CUDA machine with a CUDA build of torch and the extension built:
    pytest -q tests/test_cuda_backend.py
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from capsparse.backends import cuda as cb  # noqa: E402  (importing never loads the extension)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 2e-2)}  # (atol, rtol)


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    ok, reason = cb.is_available()
    if not ok:
        pytest.skip(f"CUDA extension unavailable: {reason}")


# ---------------------------------------------------------------------------- helpers
def make_bitmap(R, C, density, seed=0, empty_edges=False):
    g = torch.Generator().manual_seed(seed)
    if density <= 0:
        bm = torch.zeros(R, C, dtype=torch.bool)
    elif density >= 1:
        bm = torch.ones(R, C, dtype=torch.bool)
    else:
        bm = torch.rand(R, C, generator=g) < density
    if empty_edges and R > 1 and C > 1:
        bm[0, :] = False  # an empty block-row
        bm[:, -1] = False  # an empty block-column
    return bm


def ref_metadata(bitmap):
    """Pure-torch metadata exactly as in docs/design.md (CPU, int32/int64)."""
    R, C = bitmap.shape
    cap = R * C
    rows, cols = bitmap.nonzero(as_tuple=True)
    nnz = rows.numel()
    row_ptr = torch.zeros(R + 1, dtype=torch.int32)
    row_ptr[1:] = bitmap.sum(1).cumsum(0)
    col_ptr = torch.zeros(C + 1, dtype=torch.int32)
    col_ptr[1:] = bitmap.sum(0).cumsum(0)
    row_cols = torch.zeros(cap, dtype=torch.int32)
    block_rows = torch.zeros(cap, dtype=torch.int32)
    col_rows = torch.zeros(cap, dtype=torch.int32)
    row_cols[:nnz] = cols.to(torch.int32)
    block_rows[:nnz] = rows.to(torch.int32)
    tc, tr = bitmap.t().nonzero(as_tuple=True)
    col_rows[:nnz] = tr.to(torch.int32)
    return dict(row_ptr=row_ptr, row_cols=row_cols, col_ptr=col_ptr, col_rows=col_rows, block_rows=block_rows,
                block_cols=row_cols, nnz=torch.tensor(nnz, dtype=torch.int64))


def dense_mask(bitmap, b):
    return bitmap.repeat_interleave(b, 0).repeat_interleave(b, 1)


def to_dev(meta):
    return {k: v.cuda() for k, v in meta.items()}


def assert_close(out, ref, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=atol * scale, rtol=rtol)


CASES = [(b, d) for b in (32, 64) for d in (0.0, 0.03, 0.5, 1.0)]


def shapes(b):
    return (16 * b, 6 * b) if b == 32 else (8 * b, 6 * b)  # N, K


# ---------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("R,C", [(1, 1), (4, 3), (48, 12), (40, 40), (96, 24), (3, 700)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_build_block_metadata(R, C, density):
    bitmap = make_bitmap(R, C, density, seed=R * 1000 + C, empty_edges=True)
    got = cb.build_block_metadata(bitmap.cuda())
    ref = ref_metadata(bitmap)
    names = ["row_ptr", "row_cols", "col_ptr", "col_rows", "block_rows", "nnz"]
    for name, t in zip(names, got):
        assert t.is_cuda
        assert torch.equal(t.cpu(), ref[name]), name
    assert got[5].dim() == 0 and got[5].dtype == torch.int64
    # uint8 bitmaps are accepted too
    got8 = cb.build_block_metadata(bitmap.to(torch.uint8).cuda())
    assert torch.equal(got8[1].cpu(), ref["row_cols"])


# ---------------------------------------------------------------------------- block-sparse linear
@pytest.mark.parametrize("b,density", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 77, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_bsl_forward(b, density, dtype, T, bias):
    torch.manual_seed(0)
    N, K = shapes(b)
    bitmap = make_bitmap(N // b, K // b, density, seed=1, empty_edges=0 < density < 1)
    meta = to_dev(ref_metadata(bitmap))
    x = torch.randn(T, K, device="cuda").to(dtype)
    w = (torch.randn(N, K, device="cuda") * 0.05).to(dtype)
    bvec = torch.randn(N, device="cuda").to(dtype) if bias else None
    y = cb.bsl_forward(x, w, bvec, meta["row_ptr"], meta["row_cols"], b, b)
    assert y.dtype == dtype and y.shape == (T, N)
    wm = w.double() * dense_mask(bitmap, b).cuda().double()
    ref = x.double() @ wm.t() + (bvec.double() if bias else 0.0)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("b,density", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 77, 300])
def test_bsl_grad_input(b, density, dtype, T):
    torch.manual_seed(1)
    N, K = shapes(b)
    bitmap = make_bitmap(N // b, K // b, density, seed=2, empty_edges=0 < density < 1)
    meta = to_dev(ref_metadata(bitmap))
    gy = torch.randn(T, N, device="cuda").to(dtype)
    w = (torch.randn(N, K, device="cuda") * 0.05).to(dtype)
    gx = cb.bsl_grad_input(gy, w, meta["col_ptr"], meta["col_rows"], b, b)
    assert gx.dtype == dtype and gx.shape == (T, K)
    ref = gy.double() @ (w.double() * dense_mask(bitmap, b).cuda().double())
    assert_close(gx, ref, dtype)


@pytest.mark.parametrize("b,density", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 77, 300, 2100])  # 2100 tokens: split-K with a ragged last split
def test_bsl_grad_weight(b, density, dtype, T):
    torch.manual_seed(2)
    N, K = shapes(b)
    bitmap = make_bitmap(N // b, K // b, density, seed=3, empty_edges=0 < density < 1)
    meta = to_dev(ref_metadata(bitmap))
    gy = (torch.randn(T, N, device="cuda") / T ** 0.5).to(dtype)
    x = torch.randn(T, K, device="cuda").to(dtype)
    gw = cb.bsl_grad_weight(gy, x, meta["block_rows"], meta["block_cols"], meta["nnz"], b, b)
    assert gw.dtype == dtype and gw.shape == (N, K)
    mask = dense_mask(bitmap, b).cuda()
    assert torch.all(gw[~mask] == 0), "entries outside kept blocks must be exactly 0"
    ref = (gy.double().t() @ x.double()) * mask.double()
    assert_close(gw, ref, dtype)
    again = cb.bsl_grad_weight(gy, x, meta["block_rows"], meta["block_cols"], meta["nnz"], b, b)
    assert torch.equal(gw, again), "grad_weight must be deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsl_unaligned_strides_use_scalar_path(dtype):
    """Row strides that are not a multiple of 16 bytes take the non-vectorised kernels."""
    torch.manual_seed(3)
    b, N, K, T = 32, 128, 96, 45
    bitmap = make_bitmap(N // b, K // b, 0.5, seed=4)
    meta = to_dev(ref_metadata(bitmap))
    mask = dense_mask(bitmap, b).cuda().double()
    x = torch.randn(T, K + 1, device="cuda").to(dtype)[:, :K]  # row stride K + 1
    w = (torch.randn(N, K + 1, device="cuda") * 0.05).to(dtype)[:, :K]
    gy = torch.randn(T, N + 1, device="cuda").to(dtype)[:, :N]
    C = cb._C()
    y = C.bsl_forward(x, w, None, meta["row_ptr"], meta["row_cols"], b, b)
    assert_close(y, x.double() @ (w.double() * mask).t(), dtype)
    gx = C.bsl_grad_input(gy, w, meta["col_ptr"], meta["col_rows"], b, b)
    assert_close(gx, gy.double() @ (w.double() * mask), dtype)
    gw = C.bsl_grad_weight(gy, x, meta["block_rows"], meta["block_cols"], meta["nnz"], b, b)
    assert_close(gw, (gy.double().t() @ x.double()) * mask, dtype, scale=T ** 0.5)


def test_bsl_metadata_from_kernel_feeds_kernels():
    torch.manual_seed(4)
    b, N, K, T = 64, 512, 384, 200
    bitmap = make_bitmap(N // b, K // b, 0.3, seed=5, empty_edges=True).cuda()
    row_ptr, row_cols, col_ptr, col_rows, block_rows, nnz = cb.build_block_metadata(bitmap)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    y = cb.bsl_forward(x, w, None, row_ptr, row_cols, b, b)
    mask = dense_mask(bitmap.cpu(), b).cuda().double()
    assert_close(y, x.double() @ (w.double() * mask).t(), torch.bfloat16)
    gw = cb.bsl_grad_weight(y, x, block_rows, row_cols, nnz, b, b)
    assert_close(gw, (y.double().t() @ x.double()) * mask, torch.bfloat16, scale=T ** 0.5)


def test_unsupported_block_size_falls_back_to_reference():
    b, N, K, T = 16, 64, 48, 10
    bitmap = make_bitmap(N // b, K // b, 0.5, seed=6)
    meta = to_dev(ref_metadata(bitmap))
    x = torch.randn(T, K, device="cuda")
    w = torch.randn(N, K, device="cuda")
    y = cb.bsl_forward(x, w, None, meta["row_ptr"], meta["row_cols"], b, b)
    ref = x.double() @ (w.double() * dense_mask(bitmap, b).cuda().double()).t()
    assert_close(y, ref, torch.float32)


# ---------------------------------------------------------------------------- CAP contrastive
def ref_cap(q, keys, qids, kids, qlab, klab, excl, tau, normalization):
    """Autograd reference of docs/design.md's CAP loss (fp64)."""
    q = q.detach().double().requires_grad_(True)
    keys = keys.double()
    s = q @ keys.t() / tau
    B, Kn = s.shape
    ex = torch.zeros(B, Kn, dtype=torch.bool, device=s.device)
    rows = torch.nonzero(excl >= 0).flatten()
    ex[rows, excl[rows]] = True
    lse = torch.logsumexp(s.masked_fill(ex, float("-inf")), dim=1, keepdim=True)
    logp = s - lse

    def one(pos):
        pos = pos & ~ex
        n = pos.sum(1).double()
        per = (logp * pos).sum(1) / n.clamp(min=1)
        if normalization == "official":
            den = n.sum()
        else:
            den = (n > 0).sum().double()
        loss = -per.sum() / den if den > 0 else (per.sum() * 0.0)
        (g,) = torch.autograd.grad(loss, q, retain_graph=True)
        return loss.detach(), g

    lu, gu = one(qids[:, None] == kids[None, :])
    if qlab is None:
        return lu, None, gu, None
    ls, gs = one(qlab[:, None] == klab[None, :])
    return lu, ls, gu, gs


def cap_inputs(B, K, E, D, n_ids, n_labels, seed, q_dtype, k_dtype, n_bank=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n_bank = n_bank or K + 17
    bank = torch.nn.functional.normalize(torch.randn(n_bank, D, device="cuda", generator=g), dim=1).to(k_dtype)
    key_index = torch.randperm(n_bank, device="cuda", generator=g)[:K]
    extra = None
    if E:
        extra = torch.nn.functional.normalize(torch.randn(E, D, device="cuda", generator=g), dim=1).to(k_dtype)
    q = torch.nn.functional.normalize(torch.randn(B, D, device="cuda", generator=g), dim=1).to(q_dtype)
    kids = torch.randint(0, n_ids, (K + E,), device="cuda", generator=g)
    qids = torch.randint(0, n_ids, (B,), device="cuda", generator=g)
    klab = torch.randint(0, n_labels, (K + E,), device="cuda", generator=g)
    qlab = torch.randint(0, n_labels, (B,), device="cuda", generator=g)
    excl = torch.randint(-1, K + E, (B,), device="cuda", generator=g)
    keys = bank[key_index].float()
    if E:
        keys = torch.cat([keys, extra.float()])
    return q, bank, key_index, extra, qids, kids, qlab, klab, excl, keys


@pytest.mark.parametrize("normalization", ["official", "supcon"])
@pytest.mark.parametrize("q_dtype,k_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("B,K,E,D", [(40, 1000, 0, 96), (32, 4160, 32, 768), (7, 300, 5, 50)])
def test_cap_contrastive_bank(normalization, q_dtype, k_dtype, labels, B, K, E, D):
    q, bank, key_index, extra, qids, kids, qlab, klab, excl, keys = cap_inputs(
        B, K, E, D, n_ids=max(2, K // 20), n_labels=3, seed=B + K, q_dtype=q_dtype, k_dtype=k_dtype)
    tau = 0.07
    out = cb.cap_contrastive_bank(q, bank, key_index, qids, kids, qlab if labels else None,
                                  klab if labels else None, excl, tau, normalization, extra_keys=extra)
    ref = ref_cap(q.float(), keys, qids, kids, qlab if labels else None, klab if labels else None, excl, tau,
                  normalization)
    lu, ls, gu, gs = out
    assert lu.dtype == torch.float32 and lu.dim() == 0
    assert gu.dtype == q_dtype and gu.shape == (B, D)
    lowp = q_dtype != torch.float32 or k_dtype != torch.float32
    ltol = 2e-3 if lowp else 1e-4
    torch.testing.assert_close(lu.double().cpu(), ref[0].cpu(), atol=ltol, rtol=ltol)
    cos = torch.nn.functional.cosine_similarity(gu.double().flatten(), ref[2].flatten(), dim=0)
    assert cos > (0.999 if lowp else 0.99999), float(cos)
    if not lowp:
        torch.testing.assert_close(gu.double().cpu(), ref[2].cpu(), atol=1e-5, rtol=1e-3)
    if labels:
        assert ls is not None and gs is not None
        torch.testing.assert_close(ls.double().cpu(), ref[1].cpu(), atol=ltol, rtol=ltol)
        cos = torch.nn.functional.cosine_similarity(gs.double().flatten(), ref[3].flatten(), dim=0)
        assert cos > (0.999 if lowp else 0.99999), float(cos)
    else:
        assert ls is None and gs is None


@pytest.mark.parametrize("normalization", ["official", "supcon"])
def test_cap_contrastive_primitive_matches_reference(normalization):
    q, bank, key_index, extra, qids, kids, qlab, klab, excl, keys = cap_inputs(
        16, 500, 0, 64, n_ids=30, n_labels=2, seed=7, q_dtype=torch.float32, k_dtype=torch.float32)
    keys = keys.contiguous()
    out = cb.cap_contrastive(q, keys, qids, kids, qlab, klab, excl, 0.1, normalization)
    ref = ref_cap(q, keys, qids, kids, qlab, klab, excl, 0.1, normalization)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=1e-5, rtol=1e-4)


def test_cap_contrastive_no_positives_is_zero():
    B, K, D = 8, 100, 32
    q = torch.nn.functional.normalize(torch.randn(B, D, device="cuda"), dim=1)
    k = torch.nn.functional.normalize(torch.randn(K, D, device="cuda"), dim=1)
    qids = torch.arange(B, device="cuda") + 1000
    kids = torch.arange(K, device="cuda")
    excl = torch.full((B,), -1, device="cuda", dtype=torch.int64)
    for norm in ("official", "supcon"):
        lu, ls, gu, gs = cb.cap_contrastive(q, k, qids, kids, None, None, excl, 0.1, norm)
        assert float(lu) == 0.0 and ls is None and gs is None
        assert torch.all(gu == 0)


def test_cap_contrastive_self_exclusion_removes_the_only_positive():
    B, K, D = 4, 64, 32
    q = torch.nn.functional.normalize(torch.randn(B, D, device="cuda"), dim=1)
    k = torch.nn.functional.normalize(torch.randn(K, D, device="cuda"), dim=1)
    kids = torch.arange(K, device="cuda")
    qids = kids[:B].clone()
    excl = torch.arange(B, device="cuda")  # each query's only positive is excluded
    lu, _, gu, _ = cb.cap_contrastive(q, k, qids, kids, None, None, excl, 0.1, "official")
    assert float(lu) == 0.0 and torch.all(gu == 0)
