"""``torch.compile``: the compiled graph runs the backend eager would, and sparse models compile whole."""
import copy

import pytest
import torch

from _tiny import tiny_bert
from capsparse.backends import registry
from capsparse.nn import SparseLinear
from capsparse.surgery import sparse_layers, sparsify


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.fixture
def fresh_registry(monkeypatch):
    """No backend probed yet in this process: what a user's first compiled call sees."""
    monkeypatch.setattr(registry, "_STATUS", {})
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_graph_runs_the_eager_backend_not_the_reference(fresh_registry, monkeypatch):
    layer = SparseLinear(32, 32, block_size=16)
    layer.set_mask(torch.tensor([[True, False], [True, True]]))
    x = torch.randn(4, 32)
    calls = []
    for name in registry.BACKENDS:
        module = registry.get_backend(name)
        real = module.bsl_forward
        monkeypatch.setattr(module, "bsl_forward", lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    compiled = torch.compile(layer, backend=_recording_backend([]), fullgraph=True)
    y = compiled(x)
    registry._STATUS.clear()
    want = registry.resolve_backend(x.device, op="test")  # eager rule, probing now
    assert want != "reference", f"the {want!r} default is expected on this machine (cpu extension built)"
    assert calls == [want], f"compiled graph ran {calls}, eager resolves {want!r}"
    torch.testing.assert_close(y, layer(x))


def test_forced_backend_is_kept_under_compile(fresh_registry):
    from capsparse.ops import masked_linear

    mask = torch.rand(8, 8) < 0.5
    w = torch.randn(8, 8)

    def f(x):
        return masked_linear(x, w, mask, backend="bogus")

    with pytest.raises(Exception, match="backend: expected one of"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.randn(2, 8))


@pytest.mark.parametrize("block_size", [None, 16], ids=["element", "block16"])
def test_sparse_bert_compiles_fullgraph_and_matches_eager(block_size):
    torch._dynamo.reset()
    model = tiny_bert(seed=0, dropout=0.0)
    sparsify(model, block_size=block_size)
    g = torch.Generator().manual_seed(1)
    for _, layer in sparse_layers(model):
        shape = layer.mask.shape if block_size is None else layer.block_mask.shape
        layer.set_mask(torch.rand(shape, generator=g) < 0.5)
    twin = copy.deepcopy(model)
    ids = torch.randint(10, 100, (2, 8), generator=g)
    labels = torch.tensor([0, 1])
    graphs = []
    compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
    out = compiled(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = twin(input_ids=ids, labels=labels)
    ref.loss.backward()
    assert len(graphs) == 1
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(sparse_layers(model), sparse_layers(twin)):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()


def test_sparse_linear_aot_compile_matches_eager():
    """Through AOTAutograd (fake implementations, autograd.Function) with a backward pass."""
    torch._dynamo.reset()
    layer = SparseLinear(32, 48, block_size=16)
    layer.set_mask(torch.rand(3, 2, generator=torch.Generator().manual_seed(2)) < 0.6)
    twin = copy.deepcopy(layer)
    x = torch.randn(5, 32)
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    y.square().sum().backward()
    twin(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad)
    torch._dynamo.reset()
