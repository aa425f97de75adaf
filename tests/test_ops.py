"""The functional ops (through their custom ops and autograd) on every CPU backend against the references."""
import pytest
import torch
import torch.nn.functional as F

from capsparse.backends import available_backends
from capsparse.layout import BlockLayout
from capsparse.ops import (block_sparse_grad_weight, block_sparse_linear, block_sparse_linear_reference, cap_contrastive_loss,
                           cap_contrastive_loss_reference, masked_linear, masked_linear_reference)
from _grid import assert_within_torch_error, random_layout

# CPU paths never skip: the cpu backend is built by `pip install -e .`; if it is missing these tests fail.
CPU_BACKENDS = ["reference", "cpu"]
FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}


def require(backend):
    ok, reason = available_backends()[backend]
    assert ok, f"backend {backend!r} unavailable: {reason}"


CASES = [  # (out, in, block, x_shape_prefix)
    (64, 96, 32, (7,)), (128, 64, 64, (2, 5)), (64, 64, 16, (1,)), (32, 128, (16, 32), (37,)),
    (128, 128, 32, (3, 11)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-x{c[3]}")
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.03, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_block_sparse_linear_matches_reference(backend, case, density, dtype):
    require(backend)
    n, k, block, prefix = case
    layout = random_layout((n, k), block, density, seed=n + k, empty_row=density == 0.5, empty_col=density == 0.5)
    w64 = torch.randn(n, k, dtype=torch.float64)
    b64 = torch.randn(n, dtype=torch.float64)
    x64 = torch.randn(*prefix, k, dtype=torch.float64)
    g64 = torch.randn(*prefix, n, dtype=torch.float64)

    def run(fn, dt, **kw):
        x = x64.to(dt, copy=True).requires_grad_(True)
        w = w64.to(dt, copy=True).requires_grad_(True)
        b = b64.to(dt, copy=True).requires_grad_(True)
        y = fn(x, w, layout, b, **kw)
        y.backward(g64.to(dt))
        return y, x.grad, w.grad, b.grad

    ref = run(block_sparse_linear_reference, torch.float64)
    same = run(block_sparse_linear_reference, dtype)
    got = run(block_sparse_linear, dtype, backend=backend)
    for name, a, t, r in zip(("y", "dx", "dw", "db"), got, same, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_within_torch_error(a, t, r, FLOORS[dtype], name=f"{backend} {name}")
    mask = layout.to_dense_mask()
    assert (got[2][~mask] == 0).all(), "dW must be exactly zero outside kept blocks"


@pytest.mark.parametrize("backend", CPU_BACKENDS + [None])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}")
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_sparse_grad_weight_matches_masked_product(backend, case, density, dtype):
    """The functional dW (block movement scores use it): ``g^T x`` on kept blocks, exactly 0 elsewhere, with the
    backend resolved by the op (``None``: the device default)."""
    if backend is not None:
        require(backend)
    n, k, block, _ = case
    layout = random_layout((n, k), block, density, seed=n * k)
    x64, g64 = torch.randn(29, k, dtype=torch.float64), torch.randn(29, n, dtype=torch.float64)
    got = block_sparse_grad_weight(g64.to(dtype), x64.to(dtype), layout, backend=backend)
    mask = layout.to_dense_mask()
    want = (g64.t() @ x64) * mask
    assert got.dtype == dtype and got.shape == (n, k)
    assert (got[~mask] == 0).all()
    same = (g64.to(dtype).t() @ x64.to(dtype)) * mask.to(dtype)
    assert_within_torch_error(got, same, want, FLOORS[dtype], name=f"dW {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_masked_linear_matches_reference(backend, density, dtype):
    require(backend)
    w64 = torch.randn(48, 40, dtype=torch.float64)
    mask = torch.rand(48, 40) < density
    x64 = torch.randn(3, 9, 40, dtype=torch.float64)
    g64 = torch.randn(3, 9, 48, dtype=torch.float64)

    def run(fn, dt, **kw):
        x = x64.to(dt, copy=True).requires_grad_(True)
        w = w64.to(dt, copy=True).requires_grad_(True)
        y = fn(x, w, mask, None, **kw)
        y.backward(g64.to(dt))
        return y, x.grad, w.grad

    ref, same, got = run(masked_linear_reference, torch.float64), run(masked_linear_reference, dtype), \
        run(masked_linear, dtype, backend=backend)
    for name, a, t, r in zip(("y", "dx", "dw"), got, same, ref):
        assert_within_torch_error(a, t, r, FLOORS[dtype], name=f"{backend} {name}")
    assert (got[2][~mask] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_fp64(backend):
    require(backend)
    layout = random_layout((32, 48), 16, 0.5, seed=3)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, 48, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: block_sparse_linear(x, w, layout, b, backend=backend), (x, w, b))
    mask = torch.rand(32, 48) < 0.5
    assert torch.autograd.gradcheck(lambda x, w: masked_linear(x, w, mask, backend=backend), (x, w))


def test_custom_ops_pass_opcheck():
    """Schemas, fake implementations and autograd registration, as torch.compile needs them."""
    layout = random_layout((32, 32), 16, 0.5, seed=1)
    x, w, b = torch.randn(4, 32), torch.randn(32, 32), torch.randn(32)
    gy = torch.randn(4, 32)
    ops = torch.ops.capsparse
    torch.library.opcheck(ops.bsl_forward.default,
                          (x, w, b, layout.row_ptr, layout.row_cols, 16, 16, "reference", -1.0))
    torch.library.opcheck(ops.bsl_grad_input.default,
                          (gy, w, layout.col_ptr, layout.col_rows, 16, 16, "reference", 0.5))
    torch.library.opcheck(ops.bsl_grad_weight.default,
                          (gy, x, layout.block_rows, layout.block_cols, layout.nnz, 16, 16, "reference", -1.0))
    for backend in ("reference", "cpu"):  # the cpu backend has its own kernel, the others fall back to sum(0)
        torch.library.opcheck(ops.bsl_grad_bias.default, (gy, backend))
    torch.library.opcheck(ops.masked_linear_forward.default, (x, w, b, "reference"))


def test_block_sparse_linear_compiles():
    layout = random_layout((32, 32), 16, 0.5, seed=2)
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(6, 32)

    def f(x, w):
        return block_sparse_linear(x, w, layout, backend="reference").relu().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w))


# -- contrastive loss -----------------------------------------------------------------------------
def hand_loss(q, k, qid, kid, ex, tau, normalization):
    """Row by row in plain Python: the definition of docs/design.md."""
    q = F.normalize(q.double(), dim=1)
    k = F.normalize(k.double(), dim=1)
    rows, counts = [], []
    for i in range(q.shape[0]):
        keys = [j for j in range(k.shape[0]) if j != ex[i]]
        s = torch.stack([q[i] @ k[j] / tau for j in keys])
        lse = torch.logsumexp(s, 0)
        pos = [n for n, j in enumerate(keys) if kid[j] == qid[i]]
        counts.append(len(pos))
        rows.append(sum((s[n] - lse) for n in pos) / len(pos) if pos else torch.tensor(0.0, dtype=torch.float64))
    total = torch.stack(rows).sum()
    if normalization == "official":
        return -total / max(sum(counts), 1)
    anchors = sum(1 for c in counts if c > 0)
    return -total / max(anchors, 1)


@pytest.mark.parametrize("normalization", ["official", "supcon"])
def test_contrastive_reference_matches_hand_computation(normalization):
    q, k = torch.randn(4, 8), torch.randn(9, 8)
    qid = torch.tensor([0, 1, 2, 3])
    kid = torch.tensor([0, 0, 1, 5, 6, 2, 0, 3, 3])  # duplicates; id 3 twice; every row has a positive
    ex = torch.tensor([6, -1, 5, 7])  # row 2 loses its only positive -> a row without positives
    for tau in (0.1, 0.5):
        got, _ = cap_contrastive_loss_reference(q, k, qid, kid, temperature=tau, normalization=normalization,
                                                exclude_index=ex)
        want = hand_loss(q, k, qid.tolist(), kid.tolist(), ex.tolist(), tau, normalization)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_contrastive_official_is_supcon_over_mean_positives():
    """cap-method.md 2.4: official = textbook / mean |P_i| when every row has positives."""
    q, k = torch.randn(3, 6), torch.randn(12, 6)
    qid = torch.tensor([0, 1, 2])
    kid = torch.tensor([0, 0, 0, 1, 1, 2, 4, 5, 6, 7, 8, 9])
    off, _ = cap_contrastive_loss_reference(q, k, qid, kid, normalization="official")
    sup, _ = cap_contrastive_loss_reference(q, k, qid, kid, normalization="supcon")
    torch.testing.assert_close(off, sup / 2.0)  # |P| = 3, 2, 1 -> mean 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalization", ["official", "supcon"])
@pytest.mark.parametrize("labels", [True, False])
def test_contrastive_backends_match_reference(backend, normalization, labels):
    require(backend)
    b, n_keys, d = 6, 50, 16
    q = torch.randn(b, d, dtype=torch.float64)
    keys = torch.cat([q.detach() + 0.01 * torch.randn(b, d, dtype=torch.float64), torch.randn(n_keys - b, d,
                                                                                                 dtype=torch.float64)])
    qid = torch.arange(b)
    kid = torch.cat([qid, torch.randint(0, 12, (n_keys - b,))])
    ex = torch.arange(b)
    ex[1] = -1
    ql = torch.randint(0, 3, (b,)) if labels else None
    kl = torch.randint(0, 3, (n_keys,)) if labels else None
    args = dict(temperature=0.1, normalization=normalization, exclude_index=ex)
    qr = q.clone().requires_grad_(True)
    ru, rs = cap_contrastive_loss_reference(qr, keys, qid, kid, ql, kl, **args)
    qg = q.clone().float().requires_grad_(True)
    gu, gs = cap_contrastive_loss(qg, keys.float(), qid, kid, ql, kl, backend=backend, **args)
    torch.testing.assert_close(gu.double(), ru, rtol=1e-4, atol=1e-5)
    assert (gs is None) == (not labels)
    total_r = ru + (rs if labels else 0)
    total_g = gu + (gs if labels else 0)
    total_r.backward()
    total_g.backward()
    if labels:
        torch.testing.assert_close(gs.double(), rs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qg.grad.double(), qr.grad, rtol=1e-3, atol=1e-5)


def test_contrastive_gradcheck_reference():
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 5, dtype=torch.float64)
    qid, kid = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1, 2, 3, 4, 0])
    fn = lambda q: cap_contrastive_loss(q, k, qid, kid, torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1, 0, 1, 0, 1]),
                                        backend="reference")[1]
    assert torch.autograd.gradcheck(fn, (q,))


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_contrastive_backend_refuses_an_unknown_normalization(backend):
    """The backends check against the one NORMALIZATIONS tuple (the reference once read anything but 'official'
    as 'supcon')."""
    require(backend)
    from capsparse.backends import get_backend
    from capsparse.ops.contrastive import NORMALIZATIONS

    assert NORMALIZATIONS == ("official", "supcon")
    q = F.normalize(torch.randn(3, 8), dim=1)
    ids = torch.arange(3)
    with pytest.raises(ValueError, match=r"normalization: expected one of \('official', 'supcon'\), got 'mean'"):
        get_backend(backend).cap_contrastive(q, q, ids, ids, None, None, torch.full((3,), -1), 0.1, "mean")


def test_bad_inputs_name_the_argument():
    layout = BlockLayout.dense((32, 32), 16)
    w = torch.randn(32, 32)
    with pytest.raises(ValueError, match="x: expected last dim 32"):
        block_sparse_linear(torch.randn(4, 31), w, layout)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        block_sparse_linear(torch.randn(4, 32, dtype=torch.float64), w, layout)
    with pytest.raises(ValueError, match=r"weight: expected shape \(32, 32\)"):
        block_sparse_linear(torch.randn(4, 64), torch.randn(32, 64), layout)
    with pytest.raises(TypeError, match="layout"):
        block_sparse_linear(torch.randn(4, 32), w, "dense")
    with pytest.raises(ValueError, match="bias: expected shape"):
        block_sparse_linear(torch.randn(4, 32), w, layout, torch.randn(3))
    with pytest.raises(ValueError, match="backend: expected one of"):
        block_sparse_linear(torch.randn(4, 32), w, layout, backend="fpga")
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        masked_linear(torch.randn(4, 32), w, torch.ones(32, 32))
    with pytest.raises(ValueError, match=r"mask: expected shape \(32, 32\)"):
        masked_linear(torch.randn(4, 32), w, torch.ones(32, 31, dtype=torch.bool))
    q, k = torch.randn(2, 4), torch.randn(5, 4)
    ids = torch.tensor([0, 1]), torch.arange(5)
    with pytest.raises(ValueError, match="temperature"):
        cap_contrastive_loss(q, k, *ids, temperature=0.0)
    with pytest.raises(ValueError, match="normalization"):
        cap_contrastive_loss(q, k, *ids, normalization="mean")
    with pytest.raises(ValueError, match="keys: expected shape"):
        cap_contrastive_loss(q, torch.randn(5, 3), *ids)
    with pytest.raises(ValueError, match="query_labels: expected an integer tensor"):
        cap_contrastive_loss(q, k, *ids, query_labels=torch.tensor([0.5, 1.0]), key_labels=torch.zeros(5))
    with pytest.raises(ValueError, match="both or neither"):
        cap_contrastive_loss(q, k, *ids, query_labels=torch.tensor([0, 1]))


def test_env_var_forces_backend(monkeypatch):
    layout = BlockLayout.dense((32, 32), 16)
    monkeypatch.setenv("CAPSPARSE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CAPSPARSE_BACKEND: expected one of"):
        block_sparse_linear(torch.randn(2, 32), torch.randn(32, 32), layout)
    monkeypatch.setenv("CAPSPARSE_BACKEND", "cuda")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        block_sparse_linear(torch.randn(2, 32), torch.randn(32, 32), layout)


def _spy_ops(monkeypatch):
    """Counts the calls of the registered inference ops (the modules' names for them)."""
    import importlib
    calls = []
    for mod_name, attr in (("capsparse.ops.block_sparse_linear", "_bsl_forward"),
                           ("capsparse.ops.masked_linear", "_masked_linear_forward")):
        mod = importlib.import_module(mod_name)
        real = getattr(mod, attr)
        monkeypatch.setattr(mod, attr, lambda *a, real=real, attr=attr: calls.append(attr) or real(*a))
    return calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_eager_inference_skips_the_custom_op_and_matches_it(monkeypatch, backend, density):
    """Eager no-grad calls run the op's implementation directly (no dispatch round trip), with the op's result;
    under the profiler (and any tracer or dispatch mode) the registered op runs, so profiles still name it."""
    require(backend)
    calls = _spy_ops(monkeypatch)
    layout = random_layout((64, 96), 32, density, seed=3)
    w, b, x = torch.randn(64, 96), torch.randn(64), torch.randn(2, 7, 96)
    mask = torch.rand(64, 96) < density
    with torch.no_grad():
        direct = (block_sparse_linear(x, w, layout, b, backend=backend), masked_linear(x, w, mask, b, backend=backend))
    assert calls == []
    with torch.no_grad(), torch.profiler.profile():
        via_op = (block_sparse_linear(x, w, layout, b, backend=backend), masked_linear(x, w, mask, b, backend=backend))
    assert calls == ["_bsl_forward", "_masked_linear_forward"]
    for d, o in zip(direct, via_op):
        assert torch.equal(d, o)
    ref_block = block_sparse_linear_reference(x.double(), w.double(), layout, b.double())
    assert_within_torch_error(direct[0], F.linear(x, w * layout.to_dense_mask(), b), ref_block, FLOORS[torch.float32])
    ref_mask = masked_linear_reference(x.double(), w.double(), mask, b.double())
    assert_within_torch_error(direct[1], F.linear(x, w * mask, b), ref_mask, FLOORS[torch.float32])


def test_inference_under_fake_tensors_uses_the_registered_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = _spy_ops(monkeypatch)
    layout = random_layout((32, 64), 16, 0.5, seed=4)
    with FakeTensorMode(allow_non_fake_inputs=True):  # the layout's index tensors stay real
        w, x = torch.randn(32, 64), torch.randn(5, 64)
        with torch.no_grad():
            y = block_sparse_linear(x, w, layout, backend="cpu")
            z = masked_linear(x, w, torch.ones(32, 64, dtype=torch.bool), backend="cpu")
    assert y.shape == (5, 32) and z.shape == (5, 32)
    assert calls == ["_bsl_forward", "_masked_linear_forward"]


@pytest.mark.parametrize("block_size", [None, 32])
def test_sparse_linear_inference_takes_the_direct_path(monkeypatch, block_size):
    """The path users take: SparseLinear (parameters, cached masked weight) under no_grad and inference_mode."""
    from capsparse.nn import SparseLinear
    calls = _spy_ops(monkeypatch)
    layer = SparseLinear.from_linear(torch.nn.Linear(96, 64), block_size=block_size)
    if block_size is None:
        layer.set_mask(torch.rand(64, 96) < 0.2)
    else:
        layer.set_mask(torch.rand(2, 3) < 0.5)
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        z = layer(x)
    assert calls == []
    with torch.no_grad(), torch.profiler.profile():
        ref = layer(x)
    assert len(calls) == 1 and torch.equal(y, ref) and torch.equal(z, ref)
