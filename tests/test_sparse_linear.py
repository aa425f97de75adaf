"""SparseLinear and model surgery on the default model."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import capsparse
from capsparse import SparseLinear, densify, sparsify
from capsparse.models import load_default


@pytest.mark.parametrize("block_size", [None, 16, (16, 32)])
def test_from_linear_is_exact_at_density_one(block_size):
    linear = nn.Linear(64, 32)
    layer = SparseLinear.from_linear(linear, block_size=block_size, backend="reference")
    assert layer.weight is linear.weight and layer.density == 1.0
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [None, 16])
def test_set_mask_to_linear_and_state_dict_round_trip(block_size):
    layer = SparseLinear(64, 32, block_size=block_size)
    if block_size is None:
        mask = torch.rand(32, 64) < 0.3
    else:
        mask = torch.rand(2, 4) < 0.5
        mask[0, 0] = True
    layer.set_mask(mask)
    x = torch.randn(4, 64)
    dense = layer.to_linear()
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert (dense.weight[~layer.element_mask()] == 0).all()
    assert abs(layer.density - mask.float().mean().item()) < 1e-9
    clone = SparseLinear(64, 32, block_size=block_size)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)  # layout rebuilt from the loaded buffer


def test_masked_weight_cache_follows_weight_and_mask_updates():
    layer = SparseLinear(16, 8)
    layer.set_mask(torch.rand(8, 16) < 0.5)
    x = torch.randn(2, 16)
    y0 = layer(x)
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step (in place)
    y1 = layer(x)
    torch.testing.assert_close(y1, nn.functional.linear(x, layer.weight * layer.mask, layer.bias))
    assert not torch.allclose(y0, y1)
    layer.set_mask(torch.ones(8, 16, dtype=torch.bool))
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_training_step_updates_only_kept_weights():
    layer = SparseLinear(32, 32, block_size=16)
    layer.set_mask(torch.tensor([[True, False], [False, False]]))
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(5, 32)).pow(2).sum().backward()
    opt.step()
    changed = (layer.weight.detach() != before)
    assert changed[:16, :16].all() and not changed[16:].any() and not changed[:, 16:].any()


def test_set_mask_bad_inputs():
    layer = SparseLinear(32, 32, block_size=16)
    with pytest.raises(ValueError, match=r"mask: expected a block mask of shape \(2, 2\)"):
        layer.set_mask(torch.ones(32, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        layer.set_mask(torch.ones(2, 2))
    unstructured = SparseLinear(32, 16)
    with pytest.raises(ValueError, match=r"mask: expected shape \(16, 32\)"):
        unstructured.set_mask(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not divide"):
        SparseLinear(30, 32, block_size=16)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = load_default(num_labels=2)
    model.eval()
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    return model, batch


def test_sparsify_default_model_swaps_36_and_is_exact(default_model):
    model, batch = default_model
    with torch.no_grad():
        want = model(**batch).logits
    report = sparsify(model, backend="reference")
    try:
        assert len(report) == 36 and all(".encoder.layer." in n for n in report.swapped)
        assert not any(("pooler" in n or "classifier" in n or "embeddings" in n) for n in report.swapped)
        assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 36
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)
            # masking: equals a dense model with the same zeros
            gen = torch.Generator().manual_seed(0)
            for _, layer in capsparse.sparse_layers(model):
                layer.set_mask(torch.rand(layer.weight.shape, generator=gen) < 0.5)
            masked = model(**batch).logits
    finally:
        densify(model)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, rtol=1e-5, atol=1e-5)
        # restore the original weights for the other tests: densify baked zeros into them
    assert not torch.allclose(masked, want)


def test_densify_gives_back_the_plain_transformers_modules():
    """sparsify swaps dropout and sdpa self-attention for capsparse's; densify swaps them back, children kept."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model, _ = load_default(num_labels=2)
    types = {name: type(m) for name, m in model.named_modules()}
    keys = set(model.state_dict())
    sparsify(model, backend="reference")
    assert sum(type(m) is capsparse.nn.Dropout for m in model.modules()) > 0
    assert sum(type(m) is capsparse.nn.BertSelfAttention for m in model.modules()) == 6
    query = model.bert.encoder.layer[0].attention.self.query
    densify(model)
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert set(model.state_dict()) == keys
    attention = model.bert.encoder.layer[0].attention.self
    assert isinstance(attention, BertSelfAttention) and attention.query is not query  # densified linear
    assert (attention.num_attention_heads, attention.scaling, attention.layer_idx, attention.is_causal) == (
        12, 32 ** -0.5, 0, False)
    assert attention.dropout.p == model.config.attention_probs_dropout_prob


def test_sparsify_block_layout_matches_dense_with_zeros():
    model, tokenizer = load_default(num_labels=2)
    model.eval()
    batch = tokenizer(["what a film"], return_tensors="pt")
    report = sparsify(model, block_size=32, backend="reference")
    assert len(report) == 36 and report.block_size == (32, 32)
    gen = torch.Generator().manual_seed(1)
    for _, layer in capsparse.sparse_layers(model):
        layer.set_mask(torch.rand(layer.block_mask.shape, generator=gen) < 0.5)
    with torch.no_grad():
        sparse_logits = model(**batch).logits
    densify(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, sparse_logits, rtol=1e-5, atol=1e-5)


def test_sparsify_errors_before_swapping(default_model):
    model, _ = default_model
    with pytest.raises(ValueError, match="matched no Linear"):
        sparsify(model, targets=[r"encoder\.layer\.\d+\.intermediate\.dense$", r"no_such_module"])
    assert not capsparse.sparse_layers(model)
    with pytest.raises(ValueError, match="never pruned"):
        sparsify(model, targets=[r"pooler\.dense$"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        sparsify(model, targets=["("])
    with pytest.raises(ValueError, match="block_size"):
        sparsify(model, block_size=24)
    tiny = nn.Sequential()
    tiny.add_module("encoder", nn.Module())
    with pytest.raises(ValueError, match="densify"):
        densify(tiny)
    odd = nn.ModuleDict({"layer": nn.Linear(48, 40)})
    with pytest.raises(ValueError, match="does not divide"):
        sparsify(odd, block_size=16, targets=[r"^layer$"])
    assert isinstance(odd["layer"], nn.Linear)


def test_import_is_lean():
    code = ("import sys, capsparse; bad = [m for m in ('transformers', 'triton', 'capsparse._C', 'capsparse._C_cuda', "
            "'capsparse.kernels') if m in sys.modules]; import torch; "
            "assert not bad, bad; assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48), (0, 48)], ids=str)
def test_inference_path_equals_training_path(block, density, shape):
    """Under no_grad / inference_mode the forward op runs without an autograd node: same values, no graph."""
    torch.manual_seed(0)
    layer = SparseLinear(48, 32, block_size=block, backend="cpu")
    scores = torch.rand(layer.block_mask.shape if block else layer.mask.shape)
    layer.set_mask(scores < density if density < 1 else torch.ones_like(scores, dtype=torch.bool))
    x = torch.randn(*shape)
    with_graph = layer(x)
    assert with_graph.grad_fn is not None
    ref = torch.nn.functional.linear(x, (layer.weight * layer.element_mask()).detach(), layer.bias.detach())
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = layer(x)
        assert y.grad_fn is None and y.shape == ref.shape
        torch.testing.assert_close(y, with_graph.detach(), rtol=0, atol=0)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_masked_weight_cached_in_inference_mode_is_rebuilt_for_training():
    """W * M cached under inference_mode is an inference tensor: a later training forward rebuilds it
    instead of failing to save it for backward."""
    torch.manual_seed(0)
    layer = SparseLinear(8, 6)
    layer.set_mask(torch.rand(6, 8) < 0.5)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    (x @ (w * layer.mask).t()).sum().backward()
    assert torch.allclose(layer.weight.grad, w.grad)
