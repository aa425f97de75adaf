"""Pruning criteria: targets reached, straight-through score gradients, the cubic schedule."""
import pytest
import torch
from torch import nn

import _tiny  # noqa: F401  (sets 1 thread)
from capsparse.layout import kept_count_for_density
from capsparse.nn import SparseLinear
from capsparse.pruning import (SCORE_ATTR, CubicSchedule, MagnitudePruner, MovementPruner, SoftMovementPruner,
                               build_pruner, cubic_threshold)


class TwoLinear(nn.Module):
    def __init__(self, block_size=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = SparseLinear(32, 64, block_size=block_size)
        self.b = SparseLinear(64, 32, block_size=block_size)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


# -- schedule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step,expected", [(0, 1.0), (20, 1.0), (21, 0.1 + 0.9 * 0.98 ** 3), (45, 0.2125),
                                           (70, 0.1), (71, 0.1), (100, 0.1)])
def test_cubic_schedule_hand_computed(step, expected):
    # T=100, w=10, i_w=2, f_w=3: pruning from step 20 to 70
    tau, _ = cubic_threshold(step, 100, 10, 1.0, 0.1, 2, 3)
    assert tau == pytest.approx(expected, abs=1e-12)


def test_cubic_schedule_soft_lambda_and_units():
    tau, lam = cubic_threshold(45, 100, 10, 0.0, 0.1, 2, 3, final_lambda=190.0)
    assert tau == pytest.approx(0.0875) and lam == pytest.approx(166.25)
    by_epochs = CubicSchedule.resolve(100, 0.5, "epochs", steps_per_epoch=20, initial_threshold=1.0,
                                      final_threshold=0.1, initial_warmup=2, final_warmup=3)
    by_fraction = CubicSchedule.resolve(100, 0.1, "fraction", initial_threshold=1.0, final_threshold=0.1,
                                        initial_warmup=2, final_warmup=3)
    for s in (0, 21, 45, 70, 90):
        assert by_epochs(s) == by_fraction(s) == cubic_threshold(s, 100, 10, 1.0, 0.1, 2, 3)


def test_cubic_schedule_empty_window_is_an_error():
    with pytest.raises(ValueError, match="pruning window is empty"):
        CubicSchedule.resolve(30, 11000, "steps", initial_threshold=1.0, final_threshold=0.1).validate()
    with pytest.raises(ValueError, match="schedule unit"):
        CubicSchedule.resolve(30, 1, "minutes", initial_threshold=1.0, final_threshold=0.1)


# -- targets reached --------------------------------------------------------------------------------------
TOPK_CRITERIA = [("magnitude", None, {}), ("magnitude", 16, {}), ("movement", None, {"score_init_mode": "constant"}),
                 ("movement", None, {"score_init_mode": "magnitude"}),
                 ("block-movement", 16, {"score_init_mode": "constant"}),
                 ("block-movement", 16, {"score_init_mode": "magnitude"}), ("block-movement", (16, 32), {})]


@pytest.mark.parametrize("method,block,kwargs", TOPK_CRITERIA)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.03])
@pytest.mark.parametrize("trained", [False, True])
def test_topk_pruners_reach_exact_counts(method, block, kwargs, density, trained):
    model = TwoLinear(block_size=block)
    pruner = build_pruner(method, model, **kwargs)
    if trained and pruner.score_parameters():
        with torch.no_grad():
            for p in pruner.score_parameters():
                p.add_(torch.randn_like(p))
    pruner.update(density)
    for _, layer in pruner.layers:
        source = layer.mask if block is None else layer.block_mask
        assert int(source.sum()) == kept_count_for_density(source.numel(), density)
        assert int(layer.element_mask().sum()) == int(source.sum()) * (layer.weight.numel() // source.numel())
    assert pruner.num_updates == 1


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.03])
def test_global_magnitude_reaches_exact_total(block, density):
    model = TwoLinear(block_size=block)
    pruner = MagnitudePruner(model, scope="global")
    pruner.update(density)
    sources = [(l.mask if block is None else l.block_mask) for _, l in pruner.layers]
    assert sum(int(m.sum()) for m in sources) == kept_count_for_density(sum(m.numel() for m in sources), density)


def _tiny_bert_pruner(block, mode):
    from _tiny import tiny_bert

    import capsparse
    model = tiny_bert(hidden=32, intermediate=64)
    capsparse.sparsify(model, block_size=block)
    return model, build_pruner("block-movement" if block else "movement", model, score_init_mode=mode)


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("density", [0.7, 0.2])
def test_anchored_scores_first_masks_are_magnitudes(block, density):
    """The robust default's first masks equal magnitude pruning's; the official zero start does not."""
    model, pruner = _tiny_bert_pruner(block, "magnitude")
    pruner.update(density)
    anchored = [l.element_mask().clone() for _, l in pruner.layers]
    MagnitudePruner(model, layers=pruner.layers).update(density)
    magnitude = [l.element_mask().clone() for _, l in pruner.layers]
    assert all(torch.equal(a, m) for a, m in zip(anchored, magnitude))

    model, official = _tiny_bert_pruner(block, "constant")
    official.update(density)
    agree = sum(int((l.element_mask() == m).sum()) for (_, l), m in zip(official.layers, magnitude))
    total = sum(m.numel() for m in magnitude)
    assert agree < 0.9 * total  # zero scores tie: top-k by position, far from magnitude's masks


def test_anchored_scores_are_standardised_per_matrix():
    from capsparse.pruning.pruners import magnitude_anchor
    model = TwoLinear()
    with torch.no_grad():
        model.b.weight.mul_(100.0)  # scale must not matter: each matrix is standardised on its own
    for layer in (model.a, model.b):
        z = magnitude_anchor(layer, scale=2.0, offset=0.5)
        assert z.shape == layer.weight.shape
        assert abs(float(z.mean()) - 0.5) < 1e-4 and abs(float(z.std()) - 2.0) < 1e-3
        assert torch.equal(z.argsort(), layer.weight.detach().abs().argsort()) or \
            float(torch.corrcoef(torch.stack([z.flatten(), layer.weight.detach().abs().flatten()]))[0, 1]) > 0.999
    with pytest.raises(ValueError, match="score_init_mode"):
        MovementPruner(TwoLinear(), score_init_mode="zero")
    with pytest.raises(ValueError, match="score_init_scale"):
        MovementPruner(TwoLinear(), score_init_mode="magnitude", score_init_scale=0.0)


def test_magnitude_keeps_largest_and_global_scope():
    model = TwoLinear()
    MagnitudePruner(model).update(0.25)
    w, m = model.a.weight.detach().abs(), model.a.mask
    assert w[m].min() >= w[~m].max()
    model = TwoLinear()
    with torch.no_grad():
        model.b.weight.copy_(model.b.weight.abs() + 10.0)  # global top-k takes all of b first
    pruner = MagnitudePruner(model, scope="global")
    pruner.update(0.5)
    total = model.a.weight.numel() + model.b.weight.numel()
    assert int(model.a.mask.sum()) + int(model.b.mask.sum()) == kept_count_for_density(total, 0.5)
    assert bool(model.b.mask.all()) and int(model.a.mask.sum()) == total // 2 - model.b.weight.numel()


def test_movement_masks_follow_scores_and_remove():
    model = TwoLinear()
    pruner = MovementPruner(model)
    with torch.no_grad():
        model.a.movement_scores.copy_(torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32))
    pruner.update(0.25)
    assert bool(model.a.mask.reshape(-1)[-512:].all()) and not bool(model.a.mask.reshape(-1)[:-512].any())
    assert len(pruner.score_parameters()) == 2 and all(float(p.abs().sum()) >= 0 for p in pruner.score_parameters())
    pruner.remove()
    assert not hasattr(model.a, SCORE_ATTR) and not model.a._forward_hooks


def test_scores_start_at_zero_and_forward_does_not_update_masks():
    model = TwoLinear()
    pruner = MovementPruner(model, score_init_mode="constant")
    assert all(float(p.abs().sum()) == 0 for p in pruner.score_parameters())
    pruner.update(0.5)
    before = model.a.mask.clone()
    with torch.no_grad():
        model.a.movement_scores.normal_()
    model(torch.randn(4, 32)).sum().backward()
    assert torch.equal(model.a.mask, before) and pruner.num_updates == 1


# -- straight-through score gradient ----------------------------------------------------------------------
def _reference_grad_wprime(layer: SparseLinear, x, grad_out):
    wp = (layer.weight.detach() * layer.element_mask()).requires_grad_(True)
    y = torch.nn.functional.linear(x, wp, layer.bias.detach())
    y.backward(grad_out)
    return wp.grad


@pytest.mark.parametrize("block,mode", [(None, "exact"), (16, "exact"), (16, "fast")])
def test_straight_through_score_gradient(block, mode):
    torch.manual_seed(0)
    layer = SparseLinear(32, 48, block_size=block)
    pruner = MovementPruner(nn.Sequential(layer), block_score_mode=mode)
    with torch.no_grad():
        layer.movement_scores.normal_()
    pruner.update(0.5)
    x = torch.randn(3, 5, 32)
    g = torch.randn(3, 5, 48)
    layer(x).backward(g)
    expected = _reference_grad_wprime(layer, x, g) * layer.weight.detach()
    if block is not None:
        expected = expected.reshape(48 // 16, 16, 32 // 16, 16).sum(dim=(1, 3))
        if mode == "fast":
            expected = expected * layer.block_mask
    torch.testing.assert_close(layer.movement_scores.grad, expected, rtol=1e-5, atol=1e-5)
    # the pruned weights get no weight gradient, the scores of pruned entries do (exact mode)
    assert float(layer.weight.grad[~layer.element_mask()].abs().sum()) == 0
    if mode == "exact":
        pruned = ~(layer.mask if block is None else layer.block_mask)
        assert float(layer.movement_scores.grad[pruned].abs().sum()) > 0


def test_fast_mode_freezes_pruned_block_scores():
    torch.manual_seed(0)
    model = TwoLinear(block_size=16)
    pruner = MovementPruner(model, block_score_mode="fast")
    with torch.no_grad():
        for p in pruner.score_parameters():
            p.normal_()
    pruner.update(0.5)
    opt = torch.optim.AdamW(pruner.score_parameters(), lr=0.1, weight_decay=0.0)
    before = [p.detach().clone() for p in pruner.score_parameters()]
    for _ in range(2):
        model(torch.randn(4, 32)).pow(2).sum().backward()
        pruner.freeze_pruned()
        opt.step()
        pruner.restore_frozen()
        opt.zero_grad()
    for (_, layer), old in zip(pruner.layers, before):
        s = layer.movement_scores.detach()
        assert torch.equal(s[~layer.block_mask], old[~layer.block_mask])
        assert not torch.equal(s[layer.block_mask], old[layer.block_mask])


# -- soft movement ----------------------------------------------------------------------------------------
def test_soft_movement_threshold_min_keep_and_l1():
    model = TwoLinear()
    pruner = SoftMovementPruner(model)
    pruner.update(0.0)  # sigmoid(0) = 0.5 > 0: everything kept
    assert bool(model.a.mask.all())
    with torch.no_grad():
        model.a.movement_scores.fill_(-5.0)   # sigmoid ~ 0.0067 < 0.1 everywhere -> min keep
        model.b.movement_scores.normal_()
    pruner.update(0.1)
    assert int(model.a.mask.sum()) == int(0.005 * 64 * 32) + 1
    expected_b = torch.sigmoid(model.b.movement_scores) > 0.1
    assert torch.equal(model.b.mask, expected_b)
    reg = pruner.regularization()
    manual = (torch.sigmoid(model.a.movement_scores).mean() + torch.sigmoid(model.b.movement_scores).mean()) / 2
    torch.testing.assert_close(reg, manual)
    reg.backward()
    assert model.a.movement_scores.grad is not None


# -- reachability ---------------------------------------------------------------------------------------
def test_unreachable_targets_are_errors():
    model = TwoLinear(block_size=16)   # 8 blocks per matrix
    pruner = MovementPruner(model)
    with pytest.raises(ValueError, match="unreachable"):
        pruner.check_reachable(0.999, 0.01)    # keeps no block at all
    with pytest.raises(ValueError, match="unreachable"):
        pruner.check_reachable(0.8, 0.01)      # per-matrix top-k gives 0.875
    pruner.check_reachable(0.75, 0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruner.check_reachable(1.0, 0.01)
    with pytest.raises(ValueError, match="method"):
        build_pruner("first-order", model)


@pytest.mark.parametrize("block_size", [None, (16, 16)])
def test_mask_turnover_counts_regrown_units(block_size):
    """mask_turnover: share of kept units that were pruned at the previous call (1 for a full swap, 0 when settled)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(SparseLinear(64, 64, block_size=block_size), SparseLinear(64, 32, block_size=block_size))
    pruner = build_pruner("movement", model)
    with torch.no_grad():
        for _, layer in pruner.layers:
            layer.movement_scores.normal_()
    assert pruner.mask_turnover() == 0.0  # first call: the dense start
    pruner.update(0.5)
    assert pruner.mask_turnover() == 0.0  # pruning alone regrows nothing
    with torch.no_grad():
        for _, layer in pruner.layers:
            layer.movement_scores.neg_()  # the kept half and the pruned half swap
    pruner.update(0.5)
    assert pruner.mask_turnover() == 1.0
    assert pruner.mask_turnover() == 0.0
    with torch.no_grad():
        first = pruner.layers[0][1]
        first.movement_scores.neg_()  # only the first matrix swaps back
    pruner.update(0.5)
    kept = [int((l.mask if l.block_size is None else l.block_mask).sum()) for _, l in pruner.layers]
    assert pruner.mask_turnover() == pytest.approx(kept[0] / sum(kept))
