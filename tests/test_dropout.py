"""Seed-determined dropout (``capsparse.ops.dropout``): the cpu kernel against the PyTorch reference, the keep rate,
forward / backward mask identity, reproducibility, edge cases; the module swap and the attention path on a model."""
import math

import pytest
import torch
import torch.nn.functional as F

from capsparse.backends import available_backends
from capsparse.backends.reference import philox_words
from capsparse.ops import dropout, dropout_reference

CPU_BACKENDS = ["reference", "cpu"]


def require(backend):
    ok, reason = available_backends()[backend]
    assert ok, f"backend {backend!r} unavailable: {reason}"


def seed_of(value):
    return torch.tensor(value, dtype=torch.int64)


def test_philox_words_match_the_published_known_answers():
    # Random123's kat_vectors for philox4x32-10: counter 0, key 0 (ours puts the counter in words 0-1)
    assert philox_words(4, seed_of(0)).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("n", [1, 3, 31, 64, 65, 1000, 16384 * 3 + 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", [0, -1234567890123, 2 ** 62 + 5])
def test_cpu_kernel_keeps_exactly_the_reference_mask(n, dtype, seed):
    require("cpu")
    from capsparse.backends import cpu
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    y = cpu.dropout(x, 0.3, seed_of(seed))
    ref = dropout_reference(x, 0.3, seed_of(seed))
    assert torch.equal(y != 0, ref != 0)
    tol = dict(atol=0, rtol=0) if dtype != torch.bfloat16 else dict(atol=0, rtol=1e-2)
    torch.testing.assert_close(y, ref, **tol)
    # kept elements are x / (1 - p) up to the rounding of the scale
    scaled = {torch.float32: 3e-7, torch.float64: 1e-15, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y[y != 0], (x[y != 0].double() / 0.7).to(dtype), atol=0, rtol=scaled)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(backend, p):
    require(backend)
    n = 200_000
    kept = int((dropout(torch.ones(n), p, backend=backend) != 0).sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sd, f"kept {kept} of {n}, expected {n * (1 - p):.0f} +- {5 * sd:.0f}"


def test_keep_rate_test_rejects_a_wrong_rate():
    # the 5-sigma band above is narrow enough to catch a keep rate off by 1%: 0.89 instead of 0.9
    n, p = 200_000, 0.1
    kept = int((torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.89).sum())
    assert abs(kept - n * (1 - p)) >= 5 * math.sqrt(n * p * (1 - p))


def test_masks_are_independent_of_position_and_of_each_other():
    require("cpu")
    from capsparse.backends import cpu
    n = 1 << 18
    a = cpu.dropout(torch.ones(n), 0.5, seed_of(1)) != 0
    b = cpu.dropout(torch.ones(n), 0.5, seed_of(2)) != 0
    # two seeds agree on half of the elements; neighbours (one Philox word apart, and 4 / 32 / 64 apart:
    # the words of one counter and the AVX2 batch boundaries) are uncorrelated
    sd = math.sqrt(n * 0.25)
    assert abs(int((a == b).sum()) - n / 2) < 5 * sd
    for lag in (1, 4, 32, 64):
        same = int((a[lag:] == a[:-lag]).sum())
        assert abs(same - (n - lag) / 2) < 5 * math.sqrt((n - lag) * 0.25), lag


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_uses_the_forward_mask(backend):
    require(backend)
    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.4, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(x.grad, g * kept / 0.6, atol=0, rtol=1e-15)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input_and_gradient(backend):
    require(backend)
    x = torch.randn(12, 10, dtype=torch.float64).t().requires_grad_()
    torch.manual_seed(3)
    y = dropout(x, 0.5, backend=backend)
    torch.manual_seed(3)
    y2 = dropout(x.detach().contiguous(), 0.5, backend=backend)
    assert torch.equal(y, y2)
    g = torch.randn(12, 10, dtype=torch.float64).t()
    y.backward(g)
    torch.testing.assert_close(x.grad, g * (y.detach() != 0) / 0.5, atol=0, rtol=1e-15)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reproducible_under_manual_seed_and_rng_state(backend):
    require(backend)
    x = torch.randn(1000)
    torch.manual_seed(7)
    a = dropout(x, 0.2, backend=backend)
    state = torch.get_rng_state()
    b = dropout(x, 0.2, backend=backend)
    torch.set_rng_state(state)
    c = dropout(x, 0.2, backend=backend)
    torch.manual_seed(7)
    a2 = dropout(x, 0.2, backend=backend)
    assert torch.equal(a, a2) and torch.equal(b, c) and not torch.equal(a, b)


def test_cpu_and_reference_backends_draw_the_same_mask():
    require("cpu")
    x = torch.randn(5000)
    torch.manual_seed(11)
    a = dropout(x, 0.25, backend="cpu")
    torch.manual_seed(11)
    b = dropout(x, 0.25, backend="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_cases_p0_p1_eval(backend):
    require(backend)
    x = torch.randn(4, 5, requires_grad=True)
    state = torch.get_rng_state()
    assert dropout(x, 0.0, backend=backend) is x
    assert dropout(x, 0.5, training=False, backend=backend) is x
    y = dropout(x, 1.0, backend=backend)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(torch.get_rng_state(), state), "p = 0, p = 1 and eval must not draw from the generator"


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.1", True, None])
def test_bad_p_names_the_argument(p):
    with pytest.raises(ValueError, match=r"^p: expected a dropout probability in \[0, 1\]"):
        dropout(torch.randn(3), p)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="^x: expected"):
        dropout([1.0, 2.0], 0.1)
    with pytest.raises(TypeError, match="^x: expected dtype"):
        dropout(torch.ones(3, dtype=torch.int64), 0.1)


def test_gradcheck_through_the_op():
    require("cpu")
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    seed = torch.randint(0, 2 ** 62, ())

    def f(t):
        from capsparse.ops.dropout import DropoutFunction
        return DropoutFunction.apply(t, 0.3, seed, "cpu")
    assert torch.autograd.gradcheck(f, (x,))


def test_opcheck_of_the_custom_op():
    require("cpu")
    from capsparse.ops.dropout import _dropout
    torch.library.opcheck(_dropout, (torch.randn(5, 7), 0.3, seed_of(5), "cpu"))


# -- attention -------------------------------------------------------------------------------------
def qkv(b=2, h=3, length=5, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def bool_mask(b=2, length=5):
    mask = torch.ones(b, 1, length, length, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # padded keys of the second example
    return mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_without_dropout_is_sdpa(mask_kind):
    from capsparse.ops.attention import attention
    q, k, v = qkv()
    mask = {"none": None, "bool": bool_mask(), "float": torch.randn(2, 1, 5, 5, dtype=torch.float64)}[mask_kind]
    torch.testing.assert_close(attention(q, k, v, mask, p=0.0, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_with_dropout_matches_the_reference_forward_and_backward(backend):
    require(backend)
    from capsparse.ops.attention import attention, attention_reference
    q, k, v = qkv()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.manual_seed(5)
    out = attention(q, k, v, bool_mask(), p=0.3, backend=backend)
    torch.manual_seed(5)
    ref = attention_reference(q2, k2, v2, bool_mask(), p=0.3)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    out.backward(g)
    ref.backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, attention(q, k, v, bool_mask(), p=0.0)), "dropout was not applied"


def test_attention_dropout_is_unbiased():
    # E[dropout(P)] = P, so the mean output over many draws converges to the output without dropout
    from capsparse.ops.attention import attention
    q, k, v = (t.detach() for t in qkv(b=1, h=2, length=6, d=4))
    exact = attention(q, k, v, p=0.0)
    draws = torch.stack([attention(q, k, v, p=0.5) for _ in range(4000)])
    se = draws.std(0) / math.sqrt(draws.shape[0])
    z = (draws.mean(0) - exact) / se
    assert z.abs().max() < 5, f"max |z| {z.abs().max():.2f}"
    # and the test has power: a dropout without the 1 / (1 - p) rescaling is far off
    z_unscaled = (draws.mean(0) * 0.5 - exact) / (se * 0.5)
    assert z_unscaled.abs().max() > 5


def test_attention_bad_inputs_name_the_argument():
    from capsparse.ops.attention import attention
    q, k, v = qkv()
    with pytest.raises(ValueError, match="^q: expected 4 dims"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"^p: expected a dropout probability"):
        attention(q, k, v, p=2.0)


# -- modules and models ----------------------------------------------------------------------------
def sdpa_bert(seed=0, dropout_p=0.1):
    from transformers import BertForSequenceClassification
    from _tiny import tiny_config
    config = tiny_config(dropout=dropout_p)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, 7:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))


def test_sparsify_swaps_dropout_and_attention_and_keeps_the_state_dict():
    import copy
    from torch import nn
    from capsparse import nn as cnn
    from capsparse import sparsify
    model = sdpa_bert()
    plain = copy.deepcopy(model)
    sparsify(model, block_size=16)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is cnn.Dropout for m in dropouts)
    assert all(m.p == 0.1 for m in dropouts)
    attn = [layer.attention.self for layer in model.bert.encoder.layer]
    assert all(type(a) is cnn.BertSelfAttention for a in attn)
    kept = copy.deepcopy(plain)
    sparsify(kept, block_size=16, dropout=False)
    assert not any(type(m) in (cnn.Dropout, cnn.BertSelfAttention) for m in kept.modules())
    assert list(model.state_dict()) == list(kept.state_dict())


def test_fast_dropout_model_equals_the_plain_model_in_eval_and_trains():
    import copy
    from capsparse.surgery import fast_dropout
    model = sdpa_bert()
    fast = copy.deepcopy(model)
    assert len(fast_dropout(fast)) > 0
    model.eval()
    fast.eval()
    b = batch()
    torch.testing.assert_close(fast(**b).logits, model(**b).logits, atol=1e-6, rtol=1e-5)
    fast.train()
    out = fast(**b)
    out.loss.backward()
    grads = [p.grad for p in fast.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fast_dropout_model_without_dropout_matches_the_plain_model_in_training():
    # p = 0: the swapped attention takes sdpa; outputs and gradients equal the plain HF model's
    import copy
    from capsparse.surgery import fast_dropout
    model = sdpa_bert(dropout_p=0.0)
    fast = copy.deepcopy(model)
    fast_dropout(fast)
    b = batch()
    a, c = model(**b), fast(**b)
    a.loss.backward()
    c.loss.backward()
    torch.testing.assert_close(c.logits, a.logits, atol=1e-6, rtol=1e-5)
    for (name, p1), (_, p2) in zip(model.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fast_dropout_model_training_step_is_reproducible_and_backends_agree(backend):
    import copy
    from capsparse.surgery import fast_dropout
    base = sdpa_bert()
    fast_dropout(base)
    base.train()
    results = []
    for forced in (backend, "reference"):
        model = copy.deepcopy(base)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CAPSPARSE_BACKEND", forced)
            torch.manual_seed(9)
            out = model(**batch())
            out.loss.backward()
        results.append((out.logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for g1, g2 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-4)


def test_eager_models_keep_their_attention():
    from capsparse import nn as cnn
    from capsparse.surgery import fast_dropout
    from _tiny import tiny_bert
    model = tiny_bert()  # attn_implementation="eager": attention weights may be asked for, so it stays
    fast_dropout(model)
    assert not any(type(m) is cnn.BertSelfAttention for m in model.modules())
    assert any(type(m) is cnn.Dropout for m in model.modules())


def test_training_with_dropout_compiles_fullgraph_and_draws_the_eager_masks():
    from capsparse import sparsify
    torch._dynamo.reset()
    model = sdpa_bert()
    sparsify(model, block_size=16)
    model.train()
    b = batch()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    out = compiled(**b)
    torch.manual_seed(3)
    ref = model(**b)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(compiled(**b).logits, out.logits), "the compiled graph reused one mask"
    torch._dynamo.reset()


@pytest.mark.parametrize("fast", [True, False])
def test_trainer_sparsify_follows_cap_config_fast_dropout(fast):
    """CAPConfig.fast_dropout decides what the trainer's sparsify swaps: False keeps torch's dropout exactly."""
    import capsparse.nn as cnn
    from capsparse.cap import CAPConfig
    from capsparse.cap.trainer import pruning_method
    model = sdpa_bert()
    pruning_method(CAPConfig(method="movement", fast_dropout=fast), model)
    swapped = [m for m in model.modules() if type(m) in (cnn.Dropout, cnn.BertSelfAttention)]
    assert bool(swapped) is fast
    with pytest.raises(ValueError, match="fast_dropout: expected True or False, got 'no'"):
        CAPConfig(fast_dropout="no")
