"""The one sparsity report (capsparse.sparsity) against direct counts: SparseLinear element and block masks,
head / neuron masks, compacted models, and the dense case."""
import pytest
import torch

from _tiny import tiny_bert
from capsparse import sparsify
from capsparse.pruning.structured import StructuredMasks, compact_model
from capsparse.sparsity import HEAD_MASK, NEURON_MASK, sparsity_report
from capsparse.surgery import sparse_layers


def _random_masks(model, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in sparse_layers(model):
        shape = layer.mask.shape if layer.block_size is None else layer.block_mask.shape
        layer.set_mask(torch.rand(shape, generator=g) < density)


@pytest.mark.parametrize("block_size,density", [(None, 0.0), (None, 0.3), (None, 1.0), (16, 0.5)])
def test_sparse_linear_masks_match_a_direct_count(block_size, density):
    model = tiny_bert()
    sparsify(model, block_size=block_size)
    _random_masks(model, density)
    report = sparsity_report(model)
    layers = sparse_layers(model)
    kept = sum(int(layer.mask.sum()) if layer.block_size is None else
               int(layer.block_mask.sum()) * layer.block_size[0] * layer.block_size[1] for _, layer in layers)
    total = sum(layer.weight.numel() for _, layer in layers)
    assert (report.kept, report.total) == (kept, total) and len(report.per_layer) == 12
    assert report.sparsity == pytest.approx(1 - kept / total, abs=1e-12)
    for name, layer in layers:  # per layer: the zeros the masked weight really has
        zeros = int(((layer.weight * layer.element_mask()) == 0).sum())
        assert report.per_layer[name] == pytest.approx(zeros / layer.weight.numel(), abs=1e-12)
    encoder = sum(p.numel() for p in model.bert.encoder.parameters())
    assert report.encoder_params == pytest.approx((total - kept) / encoder)
    some = layers[:3]
    part = sparsity_report(model, layers=some)
    assert set(part.per_layer) == {n for n, _ in some} and part.total == sum(l.weight.numel() for _, l in some)


def test_ignored_parameters_leave_the_encoder_count():
    model = tiny_bert()
    sparsify(model)
    _random_masks(model, 0.5)
    plain = sparsity_report(model)
    for _, layer in sparse_layers(model):
        layer.register_parameter("movement_scores", torch.nn.Parameter(torch.zeros_like(layer.weight)))
    assert sparsity_report(model).encoder_params < plain.encoder_params
    assert sparsity_report(model, ignore_params=("movement_scores",)).encoder_params == plain.encoder_params


def _mask_units(model):
    masks = StructuredMasks(model)
    with torch.no_grad():
        for i, layer in enumerate(masks.layers):
            getattr(layer.attention.output, HEAD_MASK)[: i + 1] = 0
            getattr(layer.output, NEURON_MASK)[::3] = 0
    return masks


def test_head_and_neuron_masks_match_a_direct_count():
    model = tiny_bert(hidden=32, heads=4, intermediate=64)
    masks = _mask_units(model)
    d_h, h = 8, 32
    removed = 0
    for i, layer in enumerate(masks.layers):  # layer i loses i + 1 heads and a third of its neurons
        removed += 4 * (i + 1) * d_h * h + 2 * len(range(0, 64, 3)) * h
    total = 2 * (4 * h * h + 2 * h * 64)
    report = sparsity_report(model)
    assert (report.total, report.kept) == (total, total - removed)
    assert report.sparsity == pytest.approx(removed / total) and len(report.per_layer) == 12
    assert report.per_layer["bert.encoder.layer.1.attention.self.query"] == pytest.approx(0.5)

    compact_model(model, masks)  # the same weights, removed physically
    compacted = sparsity_report(model)
    assert (compacted.total, compacted.kept) == (report.total, report.kept)
    assert compacted.sparsity == pytest.approx(report.sparsity, abs=1e-12)


def test_dense_model():
    report = sparsity_report(tiny_bert())
    assert (report.sparsity, report.kept, report.total, report.per_layer) == (0.0, 0, 0, {})
    assert report.density == 1.0
