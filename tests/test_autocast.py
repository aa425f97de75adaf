"""bf16 autocast (what ``TrainingArguments(bf16=True)`` turns on) through the sparse layers and ops.

On the CPU with ``torch.autocast("cpu", dtype=torch.bfloat16)``: a bf16 activation meets an fp32
weight, as on a GPU under fp16/bf16 autocast. The layers must behave like ``nn.Linear`` does there
(cast, compute in bf16, fp32 parameter gradients).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_bert
from capsparse.nn import SparseLinear
from capsparse.ops import cap_contrastive_loss, cap_contrastive_loss_reference
from capsparse.surgery import densify, sparse_layers, sparsify

AMP = dict(device_type="cpu", dtype=torch.bfloat16)


def _prune(layer, seed):
    g = torch.Generator().manual_seed(seed)
    shape = layer.mask.shape if layer.block_size is None else layer.block_mask.shape
    layer.set_mask(torch.rand(shape, generator=g) < 0.5)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16-activation", "fp32-input"])
@pytest.mark.parametrize("block_size", [None, 16], ids=["element", "block16"])
def test_sparse_linear_under_bf16_autocast_matches_nn_linear(block_size, x_dtype):
    torch.manual_seed(0)
    layer = SparseLinear(32, 48, block_size=block_size)
    _prune(layer, 1)
    dense = layer.to_linear()  # the same function as a plain nn.Linear
    x = torch.randn(3, 5, 32).to(x_dtype)

    def run(module):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(**AMP):
            y = module(xi)
        y.float().square().sum().backward()
        return y, xi.grad, module.weight.grad, module.bias.grad

    got, want = run(layer), run(dense)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.dtype == torch.float32
    for name, a, b in zip(("y", "dx", "db"), (got[0], got[1], got[3]), (want[0], want[1], want[3])):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02, msg=name)
    mask = layer.element_mask()
    torch.testing.assert_close(got[2], want[2] * mask, atol=0.05, rtol=0.02)
    assert (got[2][~mask] == 0).all(), "dW stays masked under autocast"


@pytest.mark.parametrize("block_size", [None, 16], ids=["element", "block16"])
def test_sparsified_bert_trains_under_bf16_autocast(block_size):
    model = tiny_bert(seed=0, dropout=0.0)
    sparsify(model, block_size=block_size)
    for i, (_, layer) in enumerate(sparse_layers(model)):
        _prune(layer, i)
    plain = copy.deepcopy(model)
    densify(plain)  # nn.Linear with the masks baked in
    ids = torch.randint(10, 100, (4, 12), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 1, 0])

    def step(m):
        with torch.autocast(**AMP):
            out = m(input_ids=ids, labels=labels)
        out.loss.backward()
        return out

    got, want = step(model), step(plain)
    assert got.logits.dtype == want.logits.dtype
    assert torch.isfinite(got.loss) and abs(got.loss.item() - want.loss.item()) <= 0.03 * abs(want.loss.item())
    grads, refs = [], []
    for name, layer in sparse_layers(model):
        assert layer.weight.grad.dtype == torch.float32, name
        mask = layer.element_mask()
        assert (layer.weight.grad[~mask] == 0).all(), name
        grads.append(layer.weight.grad[mask])
        refs.append(plain.get_submodule(name).weight.grad[mask])
    # all layers together (single layers of a random tiny model can have gradients at bf16 noise level)
    cos = F.cosine_similarity(torch.cat(grads), torch.cat(refs), dim=0)
    assert cos > 0.99, f"weight-gradient cosine {cos:.4f} vs the dense twin"


def test_contrastive_loss_under_bf16_autocast_is_fp32():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(6, 16, generator=g).bfloat16().requires_grad_(True)  # a bf16 activation
    keys = torch.randn(20, 16, generator=g)  # an fp32 bank
    qid, kid = torch.randint(0, 4, (6,), generator=g), torch.randint(0, 4, (20,), generator=g)
    lab = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (20,), generator=g)
    with torch.autocast(**AMP):
        lu, ls = cap_contrastive_loss(query, keys, qid, kid, *lab)
    (lu + ls).backward()
    ref_q = query.detach().double().requires_grad_(True)
    ru, rs = cap_contrastive_loss_reference(ref_q, keys.double(), qid, kid, *lab)
    (ru + rs).backward()
    assert lu.dtype == torch.float32
    assert abs(lu.item() - ru.item()) <= 1e-5 * abs(ru.item()) and abs(ls.item() - rs.item()) <= 1e-5 * abs(rs.item())
    torch.testing.assert_close(query.grad.double(), ref_q.grad.to(torch.bfloat16).double(), atol=1e-3, rtol=2e-2)
