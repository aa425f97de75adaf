"""First-order structured pruning: importance, selection with head protection, physical compaction."""
import pytest
import torch

from _tiny import tiny_bert
from capsparse.pruning import StructuredMasks, compact_model, prune_count, select_units


def _inputs(n=3, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, 10:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def test_prune_counts_match_official_numbers():
    assert [prune_count(144, s / 10) for s in range(1, 10)] == [14, 28, 43, 57, 72, 86, 100, 115, 129]
    assert [prune_count(12 * 3072, s / 10) for s in range(1, 10)] == [3686, 7372, 11059, 14745, 18432, 22118,
                                                                     25804, 29491, 33177]


def test_selection_protects_best_active_head():
    active = torch.tensor([[False, True, True, True], [True, True, True, True]])
    imp = torch.tensor([[10.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    keep = select_units(imp, active, n_prune_total=4, protect_per_layer=1)
    # layer 0's best head (10) is already pruned: its best ACTIVE head (3) is protected instead
    assert keep[0].tolist() == [False, False, False, True]
    assert int(keep[1].sum()) == 3 and int((~keep).sum()) == 4
    keep = select_units(imp, active, n_prune_total=7, protect_per_layer=1)  # more than allowed
    assert keep.sum(1).tolist() == [1, 1] and bool(keep[0, 3])


def test_selection_is_global_after_per_layer_l2_normalisation():
    active = torch.ones(2, 4, dtype=torch.bool)
    imp = torch.tensor([[1.0, 1.0, 1.0, 1.0], [100.0, 1.0, 1.0, 1.0]])  # layer norms 2 and ~100
    keep = select_units(imp, active, n_prune_total=3, protect_per_layer=0)
    # normalised: layer 0 all 0.5, layer 1 [~1, ~0.01 x3] -> layer 1's three small heads go first
    assert keep.tolist() == [[True] * 4, [True, False, False, False]]
    keep = select_units(imp, keep, n_prune_total=3, protect_per_layer=0)  # already there: nothing more
    assert int((~keep).sum()) == 3


def test_importance_is_abs_gradient_of_masks():
    model = tiny_bert(dropout=0.0).eval()
    masks = StructuredMasks(model)
    model.double()  # float64 masks too, for the finite differences
    batches = [_inputs(seed=s) for s in range(2)]

    def loss_fn(batch):
        return model(**batch).logits.pow(2).sum()

    imp_h, imp_n = masks.accumulate_importance(loss_fn, batches)
    assert imp_h.shape == (2, 4) and imp_n.shape == (2, 64)
    assert all(p.grad is None for p in model.parameters())

    def fd(layer, kind, unit, eps=1e-4):
        total = 0.0
        for batch in batches:
            vals = []
            for sign in (1, -1):
                hm, nm = masks.head_masks().clone(), masks.neuron_masks().clone()
                (hm if kind == "h" else nm)[layer, unit] += sign * eps
                masks.set_masks(hm, nm)
                with torch.no_grad():
                    vals.append(float(loss_fn(batch)))
                (hm if kind == "h" else nm)[layer, unit] -= sign * eps
                masks.set_masks(hm, nm)
            total += abs(vals[0] - vals[1]) / (2 * eps)
        return total

    assert imp_h[1, 2].item() == pytest.approx(fd(1, "h", 2), rel=1e-4)
    assert imp_n[0, 5].item() == pytest.approx(fd(0, "n", 5), rel=1e-4)


def test_compaction_gives_the_masked_logits():
    torch.manual_seed(0)
    model = tiny_bert(dropout=0.0).eval()
    masks = StructuredMasks(model)
    heads = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    neurons = (torch.rand(2, 64) > 0.6).float()
    masks.set_masks(heads, neurons)
    batch = _inputs()
    with torch.no_grad():
        masked = model(**batch).logits
        dense_params = sum(p.numel() for p in model.parameters())
    removed = compact_model(model, masks)
    assert removed == {"heads": 5, "neurons": int((neurons == 0).sum())}
    layer0 = model.bert.encoder.layer[0]
    assert layer0.attention.self.num_attention_heads == 2 and layer0.attention.self.all_head_size == 16
    assert layer0.attention.self.query.weight.shape == (16, 32)
    assert layer0.attention.output.dense.weight.shape == (32, 16)
    assert layer0.intermediate.dense.weight.shape[0] == int(neurons[0].sum())
    assert sum(p.numel() for p in model.parameters()) < dense_params
    with torch.no_grad():
        compact = model(**batch).logits
    torch.testing.assert_close(compact, masked, rtol=1e-5, atol=1e-5)


def test_masks_zero_whole_heads():
    torch.manual_seed(0)
    model = tiny_bert(dropout=0.0).eval()
    batch = _inputs()
    with torch.no_grad():
        base = model(**batch).logits
    masks = StructuredMasks(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)  # all-ones masks change nothing
        masks.set_masks(torch.zeros(2, 4), torch.ones(2, 64))
        no_heads = model(**batch).logits
    assert not torch.allclose(no_heads, base)
    masks.remove()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
