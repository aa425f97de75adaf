"""Triton kernels (``capsparse.kernels``) against pure-torch fp64 references.

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before anything imports ``capsparse.kernels`` (Triton reads the variable
when a kernel is defined; other test modules only use CPU backends, which do not read it). Shapes
stay tiny because the interpreter is slow. bf16 on CPU goes through the kernels' fp32-upcast path
(the interpreter's bf16 ``tl.dot`` is wrong); the native bf16 tensor-core path and large shapes are
GPU-only tests, skipped here with the reason "no CUDA device".

Tolerances: block-sparse and masked products must be within 2x the error of the same-dtype torch
computation (against an fp64 reference) plus a small floor relative to the output scale, so a
dropped or misplaced block fails; contrastive losses use per-dtype relative-error and gradient
cosine bounds.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

FLOORS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _kernels(name):
    import importlib

    return importlib.import_module(f"capsparse.kernels.{name}")


def assert_close_to_ref(candidate, torch_same_dtype, ref64, dtype, name):
    """``max|cand - ref| <= 2 * max|torch - ref| + floor * max(1, max|ref|)``."""
    ref = ref64.double()
    err = (candidate.double().cpu() - ref.cpu()).abs().max().item() if ref.numel() else 0.0
    base = (torch_same_dtype.double().cpu() - ref.cpu()).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    bound = 2.0 * base + FLOORS[dtype] * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch same-dtype error {base:.3e})"


def _same_dtype_mm(a, b):
    """torch matmul in the operands' dtype (fp16/bf16 CPU matmul can be unsupported: emulate rounding)."""
    try:
        return a @ b
    except RuntimeError:
        return (a.float() @ b.float()).to(a.dtype)


class _Meta:
    """Layout metadata from capsparse.layout (the builder the layers use), as attributes."""

    @staticmethod
    def build_block_metadata(bitmap):
        from types import SimpleNamespace

        from capsparse.layout import build_block_metadata

        meta = build_block_metadata(bitmap)
        return SimpleNamespace(block_cols=meta["row_cols"], **meta)


def _bitmap(R, C, density, seed, empty_row=False, empty_col=False):
    g = torch.Generator().manual_seed(seed)
    if density >= 1:
        bm = torch.ones(R, C, dtype=torch.bool)
    elif density <= 0:
        bm = torch.zeros(R, C, dtype=torch.bool)
    else:
        bm = torch.rand(R, C, generator=g) < density
    if empty_row:
        bm[0] = False
    if empty_col:
        bm[:, -1] = False
    return bm


# ---------------------------------------------------------------------------------------------
# backend adapter
# ---------------------------------------------------------------------------------------------


def test_backend_is_available_reasons(monkeypatch):
    import importlib.util

    from capsparse.backends import triton as backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.is_available()[0]
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.is_available() == (
        False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors, slowly)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    assert backend.is_available() == (False, "triton not installed")


def test_backend_matches_reference_backend():
    from capsparse.backends import reference
    from capsparse.backends import triton as backend
    from capsparse.layout import BlockLayout

    bitmap = _bitmap(4, 3, 0.5, seed=3, empty_row=True)
    layout = BlockLayout.from_bitmap(bitmap.to(DEVICE), (128, 96), (32, 32))
    x = torch.randn(37, 96, device=DEVICE)
    w = torch.randn(128, 96, device=DEVICE)
    b = torch.randn(128, device=DEVICE)
    dy = torch.randn(37, 128, device=DEVICE)
    for mod_out, ref_out in [
        (backend.bsl_forward(x, w, b, layout.row_ptr, layout.row_cols, 32, 32),
         reference.bsl_forward(x, w, b, layout.row_ptr, layout.row_cols, 32, 32)),
        (backend.bsl_grad_input(dy, w, layout.col_ptr, layout.col_rows, 32, 32),
         reference.bsl_grad_input(dy, w, layout.col_ptr, layout.col_rows, 32, 32)),
        (backend.bsl_grad_weight(dy, x, layout.block_rows, layout.block_cols, layout.nnz, 32, 32),
         reference.bsl_grad_weight(dy, x, layout.block_rows, layout.block_cols, layout.nnz, 32, 32)),
        (backend.masked_linear_forward(x, w, b), reference.masked_linear_forward(x, w, b)),
    ]:
        torch.testing.assert_close(mod_out, ref_out, atol=1e-4, rtol=1e-4)

    q = torch.nn.functional.normalize(torch.randn(9, 16, device=DEVICE), dim=1)
    k = torch.nn.functional.normalize(torch.randn(13, 16, device=DEVICE), dim=1)
    ids = (torch.randint(0, 4, (9,), device=DEVICE), torch.randint(0, 4, (13,), device=DEVICE))
    labs = (torch.randint(0, 2, (9,), device=DEVICE), torch.randint(0, 2, (13,), device=DEVICE))
    excl = torch.randint(-1, 13, (9,), device=DEVICE)
    for norm in ("official", "supcon"):
        got = backend.cap_contrastive(q, k, *ids, *labs, excl, 0.1, norm)
        want = reference.cap_contrastive(q, k, *ids, *labs, excl, 0.1, norm)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# block-sparse linear
# ---------------------------------------------------------------------------------------------

BSL_CASES = [
    # (T, N, K, bm, bk)
    (37, 64, 96, 32, 32),
    (64, 64, 96, 32, 32),
    (37, 128, 128, 64, 64),
    (64, 128, 128, 64, 64),
]


def _bsl_refs(x, w, bias, dy, bitmap, bm, bk, dtype, gelu_input=False):
    M = bitmap.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    x64 = x.double()
    a64 = torch.nn.functional.gelu(x64) if gelu_input else x64
    wm64 = w.double() * M
    ref = dict(y=a64 @ wm64.t() + (0 if bias is None else bias.double()), dx=dy.double() @ wm64,
               dw=(dy.double().t() @ a64) * M)
    a = torch.nn.functional.gelu(x.float()).to(dtype) if gelu_input else x
    wm = w * M.to(dtype)
    same = dict(y=_same_dtype_mm(a, wm.t()) + (0 if bias is None else bias),
                dx=_same_dtype_mm(dy, wm), dw=_same_dtype_mm(dy.t(), a) * M.to(dtype))
    return ref, same


def _run_bsl(T, N, K, bm, bk, density, dtype, seed=0, empty_row=False, empty_col=False, deterministic=True,
             tokens_per_split=None, with_bias=True):
    bs, md = _kernels("block_sparse"), _Meta
    g = torch.Generator().manual_seed(seed)
    bitmap = _bitmap(N // bm, K // bk, density, seed, empty_row, empty_col)
    meta = md.build_block_metadata(bitmap.to(DEVICE))
    x = torch.randn(T, K, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(N, K, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(N, generator=g).to(dtype).to(DEVICE) if with_bias else None
    dy = torch.randn(T, N, generator=g).to(dtype).to(DEVICE)
    ref, same = _bsl_refs(x, w, bias, dy, bitmap.to(DEVICE), bm, bk, dtype)  # references on the same device
    dev = lambda t: t  # noqa: E731
    got = dict(
        y=bs.bsl_forward(dev(x), dev(w), dev(bias), meta.row_ptr, meta.row_cols, bm, bk),
        dx=bs.bsl_grad_input(dev(dy), dev(w), meta.col_ptr, meta.col_rows, bm, bk),
        dw=bs.bsl_grad_weight(dev(dy), dev(x), meta.block_rows, meta.block_cols, meta.nnz, bm, bk,
                              deterministic=deterministic, tokens_per_split=tokens_per_split),
    )
    for name in ("y", "dx", "dw"):
        assert got[name].dtype == dtype and got[name].shape == ref[name].shape
        assert_close_to_ref(got[name], same[name], ref[name], dtype, f"{name} T={T} b=({bm},{bk}) d={density}")
    M = bitmap.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    assert (got["dw"].cpu()[~M] == 0).all(), "dW must be exactly 0 outside kept blocks"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("case", BSL_CASES, ids=lambda c: "T{}_{}x{}_b{}".format(*c[:4]))
def test_block_sparse_matches_reference(case, density, dtype):
    _run_bsl(*case, density, dtype, seed=hash((case, density)) % 1000)


@pytest.mark.parametrize("empty_row,empty_col", [(True, False), (False, True), (True, True)])
def test_block_sparse_empty_block_rows_and_cols(empty_row, empty_col):
    got = _run_bsl(37, 128, 96, 32, 32, 0.7, torch.float32, seed=5, empty_row=empty_row, empty_col=empty_col)
    if empty_row:  # only the bias is left in an empty block-row
        assert (got["dw"][:32] == 0).all()
    if empty_col:
        assert (got["dx"][:, -32:] == 0).all()


@pytest.mark.parametrize("bm,bk,dtype", [(128, 128, torch.float32), (32, 64, torch.float32), (64, 32, torch.float16),
                                         (16, 16, torch.float32), (32, 32, torch.bfloat16)])
def test_block_sparse_other_blocks_and_bf16(bm, bk, dtype):
    _run_bsl(37, 2 * max(bm, 64), 2 * max(bk, 64), bm, bk, 0.5, dtype, seed=7)


@pytest.mark.parametrize("deterministic", [True, False])
def test_block_sparse_dw_split_k(deterministic):
    # 100 tokens in splits of 32: 4 partial products per kept block, reduced in two passes or by atomics
    got = _run_bsl(100, 64, 96, 32, 32, 0.5, torch.float32, seed=9, deterministic=deterministic,
                   tokens_per_split=32, with_bias=False)
    if deterministic:
        bs, md = _kernels("block_sparse"), _Meta
        g = torch.Generator().manual_seed(9)
        bitmap = _bitmap(2, 3, 0.5, 9)
        meta = md.build_block_metadata(bitmap.to(DEVICE))
        x = torch.randn(100, 96, generator=g).to(DEVICE)
        torch.randn(64, 96, generator=g)
        dy = torch.randn(100, 64, generator=g).to(DEVICE)
        again = bs.bsl_grad_weight(dy, x, meta.block_rows, meta.block_cols, meta.nnz, 32, 32, tokens_per_split=32)
        assert torch.equal(again, got["dw"]), "deterministic dW must be bitwise reproducible"


def test_block_sparse_capacity_smaller_than_grid():
    bs, md = _kernels("block_sparse"), _Meta
    bitmap = torch.zeros(4, 3, dtype=torch.bool)
    bitmap[1, 2] = bitmap[3, 0] = True
    meta = md.build_block_metadata(bitmap.to(DEVICE))
    x, dy = torch.randn(40, 96, device=DEVICE), torch.randn(40, 128, device=DEVICE)
    full = bs.bsl_grad_weight(dy, x, meta.block_rows, meta.block_cols, meta.nnz, 32, 32, tokens_per_split=16)
    small = bs.bsl_grad_weight(dy, x, meta.block_rows, meta.block_cols, meta.nnz, 32, 32, tokens_per_split=16,
                               capacity=2)
    assert torch.equal(full, small)


def test_block_sparse_gelu_fusion():
    bs, md = _kernels("block_sparse"), _Meta
    T, N, K, b = 37, 64, 96, 32
    g = torch.Generator().manual_seed(13)
    bitmap = _bitmap(N // b, K // b, 0.6, 13)
    meta = md.build_block_metadata(bitmap.to(DEVICE))
    h = torch.randn(T, K, generator=g)  # FFN2 input pre-activation
    w = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    dy = torch.randn(T, N, generator=g)
    M = bitmap.repeat_interleave(b, 0).repeat_interleave(b, 1).double()
    h64 = h.double().requires_grad_()
    y64 = torch.nn.functional.gelu(h64) @ (w.double() * M).t() + bias.double()
    (dh64,) = torch.autograd.grad(y64, h64, dy.double())
    dw64 = (dy.double().t() @ torch.nn.functional.gelu(h.double())) * M
    y = bs.bsl_forward(h.to(DEVICE), w.to(DEVICE), bias.to(DEVICE), meta.row_ptr, meta.row_cols, b, b,
                       gelu_input=True)
    dh = bs.bsl_grad_input(dy.to(DEVICE), w.to(DEVICE), meta.col_ptr, meta.col_rows, b, b, gelu_preact=h.to(DEVICE))
    dw = bs.bsl_grad_weight(dy.to(DEVICE), h.to(DEVICE), meta.block_rows, meta.block_cols, meta.nnz, b, b,
                            gelu_input=True, tokens_per_split=16)
    for got, ref, name in ((y, y64, "y"), (dh, dh64, "dh"), (dw, dw64, "dw")):
        err = (got.double().cpu() - ref.detach()).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"gelu-fused {name}: max error {err:.3e}"


def test_block_sparse_launcher_errors():
    bs, md = _kernels("block_sparse"), _Meta
    meta = md.build_block_metadata(torch.ones(2, 3, dtype=torch.bool, device=DEVICE))
    x, w = torch.randn(5, 96, device=DEVICE), torch.randn(64, 96, device=DEVICE)
    with pytest.raises(ValueError, match="bm: expected a block size in"):
        bs.bsl_forward(x, w, None, meta.row_ptr, meta.row_cols, 48, 32)
    with pytest.raises(ValueError, match="weight: expected dim 1"):
        bs.bsl_forward(torch.randn(5, 80, device=DEVICE), torch.randn(64, 80, device=DEVICE), None,
                       meta.row_ptr, meta.row_cols, 32, 32)
    with pytest.raises(ValueError, match=r"x: expected shape \(T, 96\)"):
        bs.bsl_forward(torch.randn(5, 64, device=DEVICE), w, None, meta.row_ptr, meta.row_cols, 32, 32)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float16"):
        bs.bsl_forward(x.half(), w, None, meta.row_ptr, meta.row_cols, 32, 32)
    with pytest.raises(ValueError, match=r"bias: expected shape \(64,\)"):
        bs.bsl_forward(x, w, torch.randn(63, device=DEVICE), meta.row_ptr, meta.row_cols, 32, 32)
    with pytest.raises(TypeError, match="row_ptr: expected dtype torch.int32"):
        bs.bsl_forward(x, w, None, meta.row_ptr.long(), meta.row_cols, 32, 32)
    with pytest.raises(ValueError, match=r"col_rows: expected shape \(6,\)"):
        bs.bsl_grad_input(torch.randn(5, 64, device=DEVICE), w, meta.col_ptr, meta.col_rows[:5], 32, 32)
    with pytest.raises(TypeError, match="nnz: expected dtype torch.int64"):
        bs.bsl_grad_weight(torch.randn(5, 64, device=DEVICE), x, meta.block_rows, meta.block_cols,
                           meta.nnz.int(), 32, 32)
    with pytest.raises(TypeError, match="x: expected dtype in"):
        bs.bsl_forward(x.double(), w.double(), None, meta.row_ptr, meta.row_cols, 32, 32)


# ---------------------------------------------------------------------------------------------
# contrastive
# ---------------------------------------------------------------------------------------------


def _cap_ref(q, k, qid, kid, qlab, klab, excl, tau, norm):
    """Straightforward B x K reference (fp64 when given fp64)."""
    logits = (q @ k.t()) / tau
    B, NK = logits.shape
    keep = torch.ones(B, NK, dtype=torch.bool)
    for i in range(B):
        if excl[i] >= 0:
            keep[i, excl[i]] = False
    logits = logits.masked_fill(~keep, float("-inf"))
    logp = (logits - torch.logsumexp(logits, 1, keepdim=True)).masked_fill(~keep, 0.0)

    def one(pos):
        pos = pos & keep
        cnt = pos.sum(1)
        per_row = torch.stack([(logp[i][pos[i]].sum() / cnt[i]) if cnt[i] > 0 else logp.new_zeros(())
                               for i in range(B)])
        if norm == "official":
            return -per_row.sum() / max(int(cnt.sum()), 1)
        anchors = int((cnt > 0).sum())
        return -per_row.sum() / max(anchors, 1)

    lu = one(qid[:, None] == kid[None, :])
    ls = one(qlab[:, None] == klab[None, :]) if qlab is not None else None
    return lu, ls


def _cos(a, b):
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    if a.norm() == 0 and b.norm() == 0:
        return 1.0
    return torch.nn.functional.cosine_similarity(a, b, 0).item()


def _cap_inputs(B, NK, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(NK, D, generator=g), dim=1)
    qid = torch.randint(0, 6, (B,), generator=g)
    kid = torch.randint(0, 6, (NK,), generator=g)  # duplicates: several positives per row
    qid[0] = 99  # a row with no positive
    qlab = torch.randint(0, 3, (B,), generator=g)
    klab = torch.randint(0, 3, (NK,), generator=g)
    excl = torch.randint(-1, NK, (B,), generator=g)
    pos_keys = (kid[None, :] == qid[:, None]).nonzero()
    if len(pos_keys):  # make sure one excluded key is a positive
        i, j = pos_keys[0].tolist()
        excl[i] = j
    return q, k, qid, kid, qlab, klab, excl


CAP_TOL = {torch.float32: (1e-5, 0.999999), torch.float16: (1e-3, 0.9999), torch.bfloat16: (1e-2, 0.999)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["official", "supcon"])
def test_cap_contrastive_primitive(norm, dtype):
    cc = _kernels("contrastive")
    q, k, qid, kid, qlab, klab, excl = _cap_inputs(21, 37, 40, seed=1)
    qd, kd = q.to(dtype).double(), k.to(dtype).double()  # the reference sees the rounded inputs
    q64 = qd.clone().requires_grad_()
    lu, ls = _cap_ref(q64, kd, qid, kid, qlab, klab, excl, 0.1, norm)
    gu = torch.autograd.grad(lu, q64, retain_graph=True)[0]
    gs = torch.autograd.grad(ls, q64)[0]
    dev = [t.to(DEVICE) for t in (qid, kid, qlab, klab, excl)]
    loss_u, loss_s, grad_u, grad_s = cc.cap_contrastive(q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), *dev[:4],
                                                        dev[4], 0.1, norm)
    rel, cos = CAP_TOL[dtype]
    assert loss_u.dtype == torch.float32 and loss_u.dim() == 0 and grad_u.dtype == dtype
    assert abs(loss_u.item() - lu.item()) <= rel * abs(lu.item()), (loss_u.item(), lu.item())
    assert abs(loss_s.item() - ls.item()) <= rel * abs(ls.item()), (loss_s.item(), ls.item())
    assert _cos(grad_u, gu) >= cos and _cos(grad_s, gs) >= cos
    assert (grad_u.double().cpu() - gu).abs().max() <= 10 * rel * gu.abs().max()
    assert (grad_u[0] == 0).all()  # row 0 has no unsupervised positive: it contributes nothing


def test_cap_contrastive_degenerate_rows():
    cc = _kernels("contrastive")
    # no positive anywhere -> both losses 0 and zero gradients, no NaN
    q = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).to(DEVICE)
    k = torch.nn.functional.normalize(torch.randn(7, 8), dim=1).to(DEVICE)
    qid = torch.arange(5, device=DEVICE) + 100
    kid = torch.arange(7, device=DEVICE)
    lab_q, lab_k = torch.zeros(5, dtype=torch.int64, device=DEVICE), torch.ones(7, dtype=torch.int64, device=DEVICE)
    excl = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    for norm in ("official", "supcon"):
        lu, ls, gu, gs = cc.cap_contrastive(q, k, qid, kid, lab_q, lab_k, excl, 0.1, norm)
        assert lu.item() == 0 and ls.item() == 0 and (gu == 0).all() and (gs == 0).all()
    # one key, excluded for every row: empty softmax, still finite
    k1, kid1 = k[:1].contiguous(), kid[:1].contiguous()
    qid1 = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    excl1 = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    lu, ls, gu, gs = cc.cap_contrastive(q, k1, qid1, kid1, None, None, excl1, 0.1, "official")
    assert ls is None and gs is None and lu.item() == 0 and torch.isfinite(gu).all() and (gu == 0).all()


def test_cap_contrastive_errors():
    cc = _kernels("contrastive")
    q, k = torch.randn(4, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    ids_q, ids_k = torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.zeros(5, dtype=torch.int64, device=DEVICE)
    excl = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="normalization: expected one of"):
        cc.cap_contrastive(q, k, ids_q, ids_k, None, None, excl, 0.1, "mean")
    with pytest.raises(ValueError, match=r"k: expected shape \(K, 8\)"):
        cc.cap_contrastive(q, torch.randn(5, 6, device=DEVICE), ids_q, ids_k, None, None, excl, 0.1, "official")
    with pytest.raises(TypeError, match="key_ids: expected dtype torch.int64"):
        cc.cap_contrastive(q, k, ids_q, ids_k.int(), None, None, excl, 0.1, "official")
    with pytest.raises(ValueError, match="query_labels, key_labels: expected both"):
        cc.cap_contrastive(q, k, ids_q, ids_k, ids_q, None, excl, 0.1, "official")
    with pytest.raises(ValueError, match="temperature: expected a positive float"):
        cc.cap_contrastive(q, k, ids_q, ids_k, None, None, excl, 0.0, "official")


# ---------------------------------------------------------------------------------------------
# GPU-only: native bf16 tensor-core dots and realistic shapes
# ---------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_block_sparse_ffn_shape(dtype):
    _run_bsl(4096 + 37, 3072, 768, 64, 64, 0.1, dtype, seed=31)
    _run_bsl(2048, 768, 3072, 32, 32, 0.03, dtype, seed=32)


@gpu_only
def test_gpu_contrastive_bf16_large():
    cc = _kernels("contrastive")
    B, NK, D = 2048, 4160, 768
    q = torch.nn.functional.normalize(torch.randn(B, D, device="cuda"), dim=1)
    k = torch.nn.functional.normalize(torch.randn(NK, D, device="cuda"), dim=1)
    qid = torch.randint(0, 512, (B,), device="cuda")
    kid = torch.randint(0, 512, (NK,), device="cuda")
    qlab, klab = torch.randint(0, 3, (B,), device="cuda"), torch.randint(0, 3, (NK,), device="cuda")
    excl = torch.randint(-1, NK, (B,), device="cuda")
    from capsparse.backends import reference

    want = reference.cap_contrastive(q, k, qid, kid, qlab, klab, excl, 0.1, "official")
    got = cc.cap_contrastive(q.bfloat16(), k.bfloat16(), qid, kid, qlab, klab, excl, 0.1, "official")
    for i in (0, 1):  # loss relative error <= 1e-3 (goal C6)
        assert abs(got[i].item() - want[i].item()) <= 1e-3 * abs(want[i].item())
    assert _cos(got[2], want[2]) >= 0.9999 and _cos(got[3], want[3]) >= 0.9999


# ---------------------------------------------------------------------------------------------
# launch guard and dot precision (host-side logic, checked on the CPU)
# ---------------------------------------------------------------------------------------------


def test_launch_guard_uses_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every launcher enters ``torch.cuda.device(t.device)``."""
    from types import SimpleNamespace

    common = _kernels("_common")
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with common.launch_guard(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with common.launch_guard(torch.zeros(1)):  # CPU tensors (interpreter): nothing to guard
        pass
    assert len(entered) == 1

    # each launcher goes through the guard with its input's device
    seen = []
    real = common.launch_guard
    for name in ("block_sparse", "contrastive"):
        monkeypatch.setattr(_kernels(name), "launch_guard", lambda t, _r=real: seen.append(t.device) or _r(t))
    bs, meta = _kernels("block_sparse"), _Meta.build_block_metadata(torch.ones(2, 2, dtype=torch.bool, device=DEVICE))
    x, w, dy = (torch.randn(5, 64, device=DEVICE), torch.randn(64, 64, device=DEVICE),
                torch.randn(5, 64, device=DEVICE))
    bs.bsl_forward(x, w, None, meta.row_ptr, meta.row_cols, 32, 32)
    bs.bsl_grad_input(dy, w, meta.col_ptr, meta.col_rows, 32, 32)
    bs.bsl_grad_weight(dy, x, meta.block_rows, meta.block_cols, meta.nnz, 32, 32)
    q, k, qid, kid, qlab, klab, excl = (t.to(DEVICE) for t in _cap_inputs(4, 6, 16, seed=0))
    _kernels("contrastive").cap_contrastive(q, k, qid, kid, qlab, klab, excl, 0.1, "official")
    assert seen == [x.device] * 5  # fwd, dx, dw, contrastive stats, contrastive dq


def test_fp32_dot_precision_follows_torch(monkeypatch):
    common = _kernels("_common")
    monkeypatch.setattr(common, "interpreting", lambda: False)  # the GPU rule
    for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda s=setting: s)
        assert common.dot_flags(torch.float32) == {"UPCAST": False, "IN_PREC": want}, setting
    monkeypatch.setattr(common, "interpreting", lambda: True)  # the interpreter always computes in fp32
    assert common.dot_flags(torch.float32)["IN_PREC"] == "ieee"
    assert common.dot_flags(torch.bfloat16) == {"UPCAST": True, "IN_PREC": "ieee"}


def test_tuned_config_lookup_uses_the_exact_gpu_name(monkeypatch):
    common = _kernels("_common")
    monkeypatch.setattr(common, "_TUNED", {})
    tuned = {"BLOCK_T": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    common.register_config("NVIDIA H100 80GB HBM3", "fwd", 64, 0.1, tuned)
    assert common.table_config("NVIDIA H100 80GB HBM3", "fwd", 64, 0.12) == tuned  # same 5% bucket
    default = common.table_config("NVIDIA H100 PCIe", "fwd", 64, 0.1)  # same prefix, other GPU: the default
    assert default != tuned and default["BLOCK_T"] == 128
    assert common.table_config("NVIDIA H100 80GB HBM3", "fwd", 64, 0.5) == default  # other bucket
    assert common.table_config("NVIDIA H100 PCIe", "fwd", 64, None, torch.float32)["BLOCK_T"] == 32
    with pytest.raises(ValueError, match="gpu: expected the exact"):
        common.register_config("", "fwd", 64, 0.1, tuned)
    with pytest.raises(ValueError, match="op: expected"):
        common.register_config("NVIDIA H100 80GB HBM3", "fw", 64, 0.1, tuned)
