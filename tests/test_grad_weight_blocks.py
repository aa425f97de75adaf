"""The compact kept-block dW (``block_sparse_grad_weight(compact=True)``) and its hand-over from movement scores to
the layer's backward (``GradWeightOffer``): against the dense references, with the product formed once."""
import importlib

import pytest
import torch
from torch import nn

from _grid import assert_within_torch_error, random_layout
from capsparse.backends import available_backends
from capsparse.nn import SparseLinear
from capsparse.ops import block_sparse_grad_weight
from capsparse.pruning import MovementPruner
from capsparse.pruning import score_grad as SG

BSL = importlib.import_module("capsparse.ops.block_sparse_linear")  # the module (the package exports the function)
CPU_BACKENDS = ["reference", "cpu"]
FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}
CASES = [(64, 96, 32), (128, 64, 64), (64, 64, 16), (32, 128, (16, 32)), (128, 32, (64, 16))]  # fp64: the generic path


def blocks_of(dense, layout):
    """Reference: the kept blocks of a dense [N, K] in block order (row-major over the bitmap)."""
    (r, c), (bm, bk) = layout.grid, layout.block_size
    return dense.reshape(r, bm, c, bk).permute(0, 2, 1, 3)[layout.bitmap]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}")
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [29, 1, 300])
def test_compact_grad_weight_matches_reference(backend, case, density, dtype, tokens):
    ok, reason = available_backends()[backend]
    assert ok, reason
    n, k, block = case
    layout = random_layout((n, k), block, density, seed=n + k + tokens)
    x64, g64 = torch.randn(tokens, k, dtype=torch.float64), torch.randn(tokens, n, dtype=torch.float64)
    got = block_sparse_grad_weight(g64.to(dtype), x64.to(dtype), layout, backend=backend, compact=True)
    nnz = int(layout.nnz)
    assert got.dtype == dtype and got.shape == (nnz, *layout.block_size)
    want = blocks_of(g64.t() @ x64, layout)
    same = blocks_of(g64.to(dtype).t() @ x64.to(dtype), layout)
    if nnz:
        assert_within_torch_error(got, same, want, FLOORS[dtype], name=f"compact dW {backend}")
    dense = block_sparse_grad_weight(g64.to(dtype), x64.to(dtype), layout, backend=backend)
    torch.testing.assert_close(BSL.scatter_blocks(got, layout), dense, rtol=0, atol=0)  # same kernel, same order
    w = torch.randn(n, k, dtype=torch.float64)
    sums = BSL.kept_block_sums(got.double(), w, layout)
    prod = BSL.scatter_blocks(got.double(), layout) * w
    ref, scale = SG._block_sum(prod, layout.block_size), SG._block_sum(prod.abs(), layout.block_size)
    assert sums.dtype == torch.float32
    assert ((sums.double() - ref).abs() <= 1e-5 * scale + 1e-6).all()  # fp32 sums: relative to the terms' size
    assert (sums[~layout.bitmap] == 0).all()


def _grad_weight_calls(monkeypatch):
    calls = []
    original = BSL._bsl_grad_weight

    def counting(*args):
        calls.append(1)
        return original(*args)
    monkeypatch.setattr(BSL, "_bsl_grad_weight", counting)
    return calls


@pytest.mark.parametrize("mode", ["exact", "fast", "sampled"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
def test_layer_weight_grad_from_scores_equals_reference(monkeypatch, mode, density):
    """With movement scores the layer's dW is taken from the score backward (not formed again) and still equals
    the masked dense dW; dX, db and the scores' gradient are unchanged."""
    torch.manual_seed(0)
    layer = SparseLinear(48, 64, block_size=16, backend="cpu")
    pruner = MovementPruner(nn.Sequential(layer), block_score_mode=mode)
    with torch.no_grad():
        layer.movement_scores.normal_()
    pruner.update(density)
    x, g = torch.randn(3, 7, 48, requires_grad=True), torch.randn(3, 7, 64)
    calls = _grad_weight_calls(monkeypatch)
    layer(x).backward(g)
    assert not calls, "the kept-block dW was formed twice"
    mask = layer.element_mask()
    x2, g2 = x.detach().reshape(-1, 48).double(), g.reshape(-1, 64).double()
    want = (g2.t() @ x2) * mask
    torch.testing.assert_close(layer.weight.grad.double(), want, rtol=1e-5, atol=1e-5)
    assert (layer.weight.grad[~mask] == 0).all()
    wm = (layer.weight.detach() * mask).double()
    torch.testing.assert_close(x.grad.double(), (g2 @ wm).reshape(3, 7, 48), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), g2.sum(0), rtol=1e-5, atol=1e-5)
    ref = SG.score_grad_reference(g2.float(), x2.float(), layer.weight.detach(), layer.block_size)
    keep = layer.block_mask
    torch.testing.assert_close(layer.movement_scores.grad[keep], ref[keep], rtol=1e-4, atol=1e-4)
    if mode == "exact":
        torch.testing.assert_close(layer.movement_scores.grad, ref, rtol=1e-4, atol=1e-4)
    if mode == "fast":
        assert (layer.movement_scores.grad[~keep] == 0).all()


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_offer_refused_when_the_output_gradient_has_other_terms(monkeypatch, mode):
    """If the raw output also feeds something else, the layer's backward gets more than the score function saw:
    it must form its own dW."""
    torch.manual_seed(1)
    layer = SparseLinear(32, 48, block_size=16, backend="cpu")
    mask = torch.rand(3, 2) < 0.6
    mask[0, 0] = True
    layer.set_mask(mask)
    scores = torch.zeros(3, 2, requires_grad=True)
    x, g, h = torch.randn(9, 32), torch.randn(9, 48), torch.randn(9, 48)
    calls = _grad_weight_calls(monkeypatch)
    out = layer(x)
    y = SG.MovementScoreFunction.apply(out, x, layer.weight, scores, layer, mode)
    ((y * g).sum() + (out * h).sum()).backward()
    assert len(calls) == 1
    want = ((g + h).t().double() @ x.double()) * layer.element_mask()
    torch.testing.assert_close(layer.weight.grad.double(), want, rtol=1e-5, atol=1e-5)


def test_no_offer_without_weight_grad_or_under_no_grad():
    layer = SparseLinear(32, 32, block_size=16, backend="cpu")
    with torch.no_grad():
        assert BSL.grad_weight_offer(layer(torch.randn(2, 32))) is None
    layer.weight.requires_grad_(False)
    assert BSL.grad_weight_offer(layer(torch.randn(2, 32))) is None
    layer.weight.requires_grad_(True)
    assert isinstance(BSL.grad_weight_offer(layer(torch.randn(2, 32))), BSL.GradWeightOffer)
