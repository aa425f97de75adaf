"""Movement score gradients (capsparse.pruning.score_grad): every mode against the dense formula."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from capsparse.nn import SparseLinear
from capsparse.pruning import score_grad as SG


def layer_case(seed=0, n=64, k=48, bs=16, t=50, density=0.4):
    gen = torch.Generator().manual_seed(seed)
    layer = SparseLinear.from_linear(nn.Linear(k, n), block_size=bs)
    mask = torch.rand(n // bs, k // bs, generator=gen) < density
    mask[0, 0], mask[-1, -1] = True, False
    layer.set_mask(mask)
    x, g = torch.randn(t, k, generator=gen), torch.randn(t, n, generator=gen)
    return layer, x, g


def through_autograd(layer, x, g, mode):
    scores = torch.zeros(layer.block_mask.shape, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    y = SG.MovementScoreFunction.apply(out, xg, layer.weight, scores, layer, mode)
    y.backward(g)
    return scores.grad, xg.grad


def test_exact_and_fast_match_the_dense_formula():
    layer, x, g = layer_case()
    ref = SG.score_grad_reference(g, x, layer.weight.detach(), layer.block_size)
    exact, gx = through_autograd(layer, x, g, "exact")
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)
    fast, gx_fast = through_autograd(layer, x, g, "fast")
    torch.testing.assert_close(fast, torch.where(layer.block_mask, ref, torch.zeros_like(ref)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_fast)  # the output gradient passes through unchanged
    elem = SparseLinear.from_linear(nn.Linear(48, 64))
    scores = torch.zeros(64, 48, requires_grad=True)
    SG.MovementScoreFunction.apply(elem(x), x, elem.weight, scores, elem, "exact").backward(g)
    torch.testing.assert_close(scores.grad, SG.score_grad_reference(g, x, elem.weight.detach(), None),
                               rtol=1e-4, atol=1e-4)


def test_sampled_kept_blocks_exact_and_full_fraction_is_exact():
    layer, x, g = layer_case(1)
    w = layer.weight.detach()
    ref = SG.score_grad_reference(g, x, w, layer.block_size)
    got, _ = through_autograd(layer, x, g, "sampled")
    keep = layer.block_mask
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[~keep], ref[~keep], rtol=1e-3, atol=1e-3)  # pruned blocks: an estimate
    full = SG.sampled_block_score_grad(layer, layer.layout, g, x, w, fraction=1.0)
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)


def test_sampled_estimate_is_unbiased():
    layer, x, g = layer_case(2, t=40)
    w = layer.weight.detach()
    ref = SG.score_grad_reference(g, x, w, layer.block_size)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([SG.sampled_block_score_grad(layer, layer.layout, g, x, w, fraction=0.125, generator=gen)
                         for _ in range(3000)])
    pruned = ~layer.block_mask
    mean, std = draws.mean(0)[pruned], draws.std(0)[pruned]
    assert (std > 0).all()
    z = (mean - ref[pruned]).abs() / (std / draws.shape[0] ** 0.5)
    assert z.max() < 4.5, z.max()  # a biased estimator (e.g. unscaled: 1/8 of the sum) fails this by far
    unscaled = draws.mean(0)[pruned] / 8
    assert ((unscaled - ref[pruned]).abs() / (std / draws.shape[0] ** 0.5)).max() > 10


def test_bad_mode_and_fraction():
    layer, x, g = layer_case(3)
    with pytest.raises(ValueError, match="mode"):
        through_autograd(layer, x, g, "approx")
    with pytest.raises(ValueError, match="sample_fraction"):
        SG.sample_tokens(10, 0.0, "cpu")
    assert SG.sample_tokens(10, 0.01, "cpu").numel() == 1 and SG.sample_tokens(0, 0.5, "cpu").numel() == 0
    idx = SG.sample_tokens(100, 0.3, "cpu")
    assert idx.numel() == 30 and idx.unique().numel() == 30
