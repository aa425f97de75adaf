"""score_criterion="saliency": the PLATON-style EMA of |dL/dW' * W| times its uncertainty, against a plain loop."""
import pytest
import torch
from safetensors import safe_open
from torch import nn

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse import from_pretrained
from capsparse.cap.config import CAPConfig
from capsparse.cap.trainer import CAPTrainer
from capsparse.layout import kept_count_for_density, topk_mask
from capsparse.nn import SparseLinear
from capsparse.pruning import SCORE_ATTR, MovementPruner
from capsparse.pruning.pruners import SALIENCY_BUFFERS
from capsparse.pruning.score_grad import score_grad_reference
from capsparse.surgery import sparse_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _net(block):
    torch.manual_seed(0)
    return nn.Sequential(SparseLinear(32, 48, block_size=block), nn.Tanh(), SparseLinear(48, 32, block_size=block))


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_saliency_matches_a_plain_ema_and_reaches_exact_counts(block, density):
    net = _net(block)
    pruner = MovementPruner(net, score_criterion="saliency", saliency_betas=(0.8, 0.9))
    assert pruner.score_parameters() == []  # nothing for the optimizer to train
    layers = [layer for _, layer in pruner.layers]
    ref_i = [torch.zeros_like(layer.saliency_mean) for layer in layers]
    ref_u = [torch.zeros_like(layer.saliency_mean) for layer in layers]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(5, 7, 32, generator=gen)
        inputs, grads = {}, {}
        hooks = []
        for i, layer in enumerate(layers):  # each layer's input and dL/d(output), for the reference
            hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach())))
            hooks.append(layer.register_full_backward_hook(lambda m, gi, go, i=i: grads.__setitem__(i, go[0].detach())))
        out = net(x)
        (out.square().sum() + out.sum()).backward()
        for h in hooks:
            h.remove()
        for i, layer in enumerate(layers):
            g2, x2 = grads[i].reshape(-1, grads[i].shape[-1]), inputs[i].reshape(-1, inputs[i].shape[-1])
            g = score_grad_reference(g2, x2, layer.weight.detach(), layer.block_size).abs()
            ref_i[i] = 0.8 * ref_i[i] + 0.2 * g
            ref_u[i] = 0.9 * ref_u[i] + 0.1 * (g - ref_i[i]).abs()
        net.zero_grad()
        pruner.update(density)
        for i, layer in enumerate(layers):
            torch.testing.assert_close(layer.saliency_mean, ref_i[i], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(layer.saliency_uncertainty, ref_u[i], rtol=1e-4, atol=1e-6)
            assert getattr(layer, SCORE_ATTR).grad is None  # consumed
            source = layer.mask if block is None else layer.block_mask
            assert int(source.sum()) == kept_count_for_density(source.numel(), density)
            assert torch.equal(source, topk_mask(ref_i[i] * ref_u[i], density))


def test_saliency_keeps_weights_the_loss_depends_on():
    layer = SparseLinear(16, 8)
    torch.manual_seed(0)
    pruner = MovementPruner(nn.Sequential(layer), score_criterion="saliency")
    for _ in range(5):
        x = torch.randn(32, 16)
        x[:, 8:] = 0  # the second half of the inputs carries nothing: their weights get no gradient
        layer(x).square().sum().backward()
        pruner.update(0.5)
    assert layer.mask[:, :8].all() and not layer.mask[:, 8:].any()


def test_saliency_options_are_checked():
    with pytest.raises(ValueError, match="score_criterion"):
        MovementPruner(_net(None), score_criterion="platon")
    with pytest.raises(ValueError, match="saliency_betas"):
        MovementPruner(_net(None), score_criterion="saliency", saliency_betas=(0.85, 1.0))
    with pytest.raises(ValueError, match="score_criterion.*soft-movement"):
        CAPConfig(method="soft-movement", score_criterion="saliency")
    with pytest.raises(ValueError, match="saliency_betas"):
        CAPConfig(score_criterion="saliency", saliency_betas=(0.9,))
    cfg = CAPConfig.from_dict(CAPConfig(score_criterion="saliency", saliency_betas=[0.5, 0.6]).to_dict())
    assert cfg.saliency_betas == (0.5, 0.6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(score_criterion="saliency", score_lr=0.1), "score_lr: set to 0.1, but score_criterion='saliency'"),
    (dict(score_criterion="saliency", score_init_scale=2.0), "score_init_scale: set to 2.0"),
    (dict(saliency_betas=(0.5, 0.6)), "saliency_betas: set to .*score_criterion='learned'"),
    (dict(method="magnitude", score_init_mode="constant"), "score_init_mode: .*'magnitude' has no movement scores"),
])
def test_config_refuses_score_knobs_nothing_reads(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAPConfig(**kwargs)


@pytest.mark.parametrize("method,block", [("movement", None), ("block-movement", 16)])
def test_training_with_saliency_reaches_target_without_training_scores(tmp_path, method, block):
    cfg = tiny_cap_config(method=method, block_size=block, score_criterion="saliency", target_sparsity=0.5,
                          banks=("fic",))
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=12), cfg, tiny_dataset(48),
                         teacher=tiny_bert(seed=1))
    trainer.train()
    layer = trainer.model.bert.encoder.layer[0].intermediate.dense
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(getattr(layer, SCORE_ATTR)) not in optimized
    assert layer.saliency_mean.sum() > 0 and layer.saliency_uncertainty.sum() > 0
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=1e-6)
    source = layer.mask if block is None else layer.block_mask
    assert torch.equal(source, topk_mask(layer.saliency_mean * layer.saliency_uncertainty, 0.5))
    # save_model leaves the training-only saliency statistics out, as the movement scores: the directory loads back
    trainer.save_model(str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith(SALIENCY_BUFFERS)]
    assert hasattr(layer, "saliency_mean")  # and they stay on the model (training may go on)
    loaded = from_pretrained(tmp_path / "hf", backend="reference")
    for (_, a), (_, b) in zip(sparse_layers(trainer.model), sparse_layers(loaded)):
        assert torch.equal(a.element_mask(), b.element_mask())



def test_a_non_finite_step_leaves_the_saliency_statistics_alone():
    layer = SparseLinear(16, 8)
    torch.manual_seed(0)
    pruner = MovementPruner(nn.Sequential(layer), score_criterion="saliency")
    layer(torch.randn(32, 16)).square().sum().backward()
    pruner.update(0.5)
    before = [layer.saliency_mean.clone(), layer.saliency_uncertainty.clone()]
    x = torch.randn(32, 16)
    x[0, 0] = float("nan")  # one bad batch (the NaN guard skips its step; the EMA must skip it too)
    layer(x).square().sum().backward()
    pruner.update(0.5)
    assert torch.equal(layer.saliency_mean, before[0]) and torch.equal(layer.saliency_uncertainty, before[1])
    assert getattr(layer, SCORE_ATTR).grad is None
    assert int(layer.mask.sum()) == kept_count_for_density(layer.mask.numel(), 0.5)


def test_the_saliency_receptacle_follows_the_weight_to_its_device():
    layer = SparseLinear(16, 8)
    pruner = MovementPruner(nn.Sequential(layer), score_criterion="saliency")
    setattr(layer, SCORE_ATTR, torch.zeros(8, 16, device="meta").requires_grad_(True))  # as after model.to(device)
    layer(torch.randn(4, 16)).sum().backward()
    receptacle = getattr(layer, SCORE_ATTR)
    assert receptacle.device == layer.weight.device and receptacle.grad is not None
    pruner.update(0.5)
    assert layer.saliency_mean.sum() > 0


def test_fp16_with_saliency_is_refused(tmp_path):
    cfg = tiny_cap_config(score_criterion="saliency", banks=("fic",))
    args = tiny_args(tmp_path, max_steps=1)
    args.fp16 = True
    with pytest.raises(ValueError, match="fp16=True with score_criterion='saliency'"):
        CAPTrainer(tiny_bert(), args, cfg, tiny_dataset(8), teacher=tiny_bert(seed=1))
