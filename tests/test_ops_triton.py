"""Every public op with ``backend="triton"`` against its reference, forward and backward.

Without a CUDA device the Triton kernels run on CPU tensors through the interpreter
(``TRITON_INTERPRET=1``, set by conftest before triton is imported), so shapes stay tiny. This is
the path a GPU user hits first: the public op -> registry -> custom op -> triton backend -> kernel,
including the custom-op output checks (no aliasing outputs) and the density dispatch.
"""
import pytest
import torch

from _grid import assert_within_torch_error, random_layout
from capsparse.backends import available_backends
from capsparse.ops import (block_sparse_linear, block_sparse_linear_reference, cap_contrastive_loss,
                           cap_contrastive_loss_reference, masked_linear, masked_linear_reference)

pytest.importorskip("triton", reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOORS = {torch.float32: 2e-6, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _triton_available():
    ok, reason = available_backends()["triton"]
    assert ok, f"backend 'triton' unavailable: {reason}"


def _run_linear(fn, dt, x64, w64, b64, g64, *args, **kw):
    x = x64.to(DEVICE, dt, copy=True).requires_grad_(True)
    w = w64.to(DEVICE, dt, copy=True).requires_grad_(True)
    b = b64.to(DEVICE, dt, copy=True).requires_grad_(True)
    y = fn(x, w, *args, b, **kw)
    y.backward(g64.to(DEVICE, dt))
    return [t.detach().cpu() for t in (y, x.grad, w.grad, b.grad)]


@pytest.mark.parametrize("density,hint", [(0.5, None), (0.25, 0.25), (1.0, 1.0)],
                         ids=["no-hint", "sparse-hint", "dense-hint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_block_sparse_linear_triton(density, hint, dtype):
    """``density`` hint: 0.25 kept (75% sparse) runs the kernels, 1.0 runs the dense fallback."""
    layout = random_layout((64, 96), 32, density, seed=5, empty_row=density == 0.5)
    layout_dev = layout.to(DEVICE)
    x64, g64 = torch.randn(2, 9, 96, dtype=torch.float64), torch.randn(2, 9, 64, dtype=torch.float64)
    w64, b64 = torch.randn(64, 96, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    ref = _run_linear(block_sparse_linear_reference, torch.float64, x64, w64, b64, g64, layout_dev)
    same = _run_linear(block_sparse_linear_reference, torch.float32, x64, w64, b64, g64, layout_dev)
    got = _run_linear(block_sparse_linear, dtype, x64, w64, b64, g64, layout_dev, backend="triton", density=hint)
    for name, a, t, r in zip(("y", "dx", "dw", "db"), got, same, ref):
        assert a.dtype == dtype, name
        assert_within_torch_error(a.float(), t, r, FLOORS[dtype], name=f"triton {name}")
    assert (got[2][~layout.to_dense_mask()] == 0).all(), "dW must be exactly zero outside kept blocks"


def test_density_hint_selects_dense_or_kernels(monkeypatch):
    from capsparse.backends import triton as backend
    from capsparse.kernels import block_sparse

    calls = []
    for name in ("bsl_forward", "bsl_grad_input", "bsl_grad_weight"):
        real = getattr(block_sparse, name)
        monkeypatch.setattr(block_sparse, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    layout = random_layout((64, 64), 32, 0.5, seed=1).to(DEVICE)
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, 64, device=DEVICE, requires_grad=True)
    block_sparse_linear(x, w, layout, backend="triton", density=0.9).sum().backward()  # 10% sparse: dense
    assert calls == []
    block_sparse_linear(x, w, layout, backend="triton", density=0.25).sum().backward()  # 75% sparse: kernels
    assert sorted(calls) == ["bsl_forward", "bsl_grad_input", "bsl_grad_weight"]
    block_sparse_linear(x, w, layout, backend="triton").sum().backward()  # unknown: kernels
    assert len(calls) == 6
    assert backend.use_dense(0.6, 64, 64) and not backend.use_dense(0.4, 64, 64) and not backend.use_dense(None, 64, 64)
    with pytest.raises(ValueError, match=r"density: expected a kept fraction in \[0, 1\]"):
        block_sparse_linear(x, w, layout, backend="triton", density=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_masked_linear_triton(dtype):
    mask = torch.rand(48, 40) < 0.3
    x64, g64 = torch.randn(3, 7, 40, dtype=torch.float64), torch.randn(3, 7, 48, dtype=torch.float64)
    w64, b64 = torch.randn(48, 40, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    ref = _run_linear(masked_linear_reference, torch.float64, x64, w64, b64, g64, mask.to(DEVICE))
    same = _run_linear(masked_linear_reference, torch.float32, x64, w64, b64, g64, mask.to(DEVICE))
    got = _run_linear(masked_linear, dtype, x64, w64, b64, g64, mask.to(DEVICE), backend="triton")
    for name, a, t, r in zip(("y", "dx", "dw", "db"), got, same, ref):
        assert_within_torch_error(a.float(), t, r, FLOORS[dtype], name=f"triton {name}")
    assert (got[2][~mask] == 0).all()


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("normalization", ["official", "supcon"])
def test_cap_contrastive_loss_triton(labels, normalization):
    """The CAP default (labels given) crashed here: the kernel returned two views of one tensor."""
    g = torch.Generator().manual_seed(7)
    B, K, D = 13, 37, 24  # more keys than one split under the interpreter: the split merge is exercised
    query = torch.randn(B, D, generator=g, dtype=torch.float64)
    keys = torch.randn(K, D, generator=g, dtype=torch.float64)
    qid, kid = torch.randint(0, 5, (B,), generator=g), torch.randint(0, 5, (K,), generator=g)
    qlab, klab = (torch.randint(0, 3, (B,), generator=g), torch.randint(0, 3, (K,), generator=g)) if labels \
        else (None, None)
    excl = torch.randint(-1, K, (B,), generator=g)
    weights = (0.7, 1.3)

    def run(fn, dt, dev, **kw):
        q = query.to(dev, dt, copy=True).requires_grad_(True)
        lab = {} if qlab is None else dict(query_labels=qlab.to(dev), key_labels=klab.to(dev))
        lu, ls = fn(q, keys.to(dev, dt), qid.to(dev), kid.to(dev), temperature=0.1, normalization=normalization,
                    exclude_index=excl.to(dev), **lab, **kw)
        total = weights[0] * lu + (weights[1] * ls if ls is not None else 0.0)
        total.backward()
        return lu, ls, q.grad.cpu()

    ref_u, ref_s, ref_g = run(cap_contrastive_loss_reference, torch.float64, "cpu")
    lu, ls, grad = run(cap_contrastive_loss, torch.float32, DEVICE, backend="triton")
    assert lu.dtype == torch.float32 and lu.grad_fn is not None
    assert abs(lu.item() - ref_u.item()) <= 1e-5 * abs(ref_u.item())
    assert (ls is None) == (not labels)
    if labels:
        assert abs(ls.item() - ref_s.item()) <= 1e-5 * abs(ref_s.item())
    torch.testing.assert_close(grad.double(), ref_g, atol=1e-6, rtol=1e-4)
