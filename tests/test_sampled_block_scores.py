"""block_score_mode="sampled" as a public option: config, pruner hook (unbiased vs exact), training reaches target."""
import pytest
import torch
from torch import nn

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap.config import CAPConfig
from capsparse.cap.trainer import CAPTrainer
from capsparse.nn import SparseLinear
from capsparse.pruning import BLOCK_SCORE_MODES, MovementPruner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_sampled_is_an_option():
    assert "sampled" in BLOCK_SCORE_MODES
    assert CAPConfig(method="block-movement", block_size=32, block_score_mode="sampled").block_score_mode == "sampled"
    with pytest.raises(ValueError, match="block_score_mode"):
        CAPConfig(method="block-movement", block_size=32, block_score_mode="sample")


def _score_grad(layer, x, g, seed):
    layer.movement_scores.grad = None
    torch.manual_seed(seed)  # the token subsample uses the global generator
    layer(x).backward(g)
    return layer.movement_scores.grad.clone()


def test_pruner_hook_sampled_mean_matches_exact():
    torch.manual_seed(0)
    layer = SparseLinear(48, 64, block_size=16)
    pruner = MovementPruner(nn.Sequential(layer), block_score_mode="exact")
    pruner.update(0.4)
    x, g = torch.randn(2, 20, 48), torch.randn(2, 20, 64)
    exact = _score_grad(layer, x, g, 0)
    pruner.block_score_mode = "sampled"
    draws = torch.stack([_score_grad(layer, x, g, s) for s in range(2000)])
    keep = layer.block_mask
    torch.testing.assert_close(draws[0][keep], exact[keep], rtol=1e-4, atol=1e-4)  # kept blocks: exact
    pruned = ~keep
    mean, std = draws.mean(0)[pruned], draws.std(0)[pruned]
    assert (std > 0).all()  # pruned blocks: a random estimate
    z = (mean - exact[pruned]).abs() / (std / draws.shape[0] ** 0.5)
    assert z.max() < 4.5, z.max()
    # the same test rejects a biased estimate (scaled by half)
    assert ((mean / 2 - exact[pruned]).abs() / (std / draws.shape[0] ** 0.5)).max() > 10


def test_training_with_sampled_scores_reaches_target(tmp_path):
    cfg = tiny_cap_config(method="block-movement", block_size=16, block_score_mode="sampled", target_sparsity=0.5,
                          banks=("fic",))
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=12), cfg, tiny_dataset(48),
                         teacher=tiny_bert(seed=1))
    trainer.train()
    assert trainer.pruner.block_score_mode == "sampled" and not trainer.pruner.freezes_pruned
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=1e-6)
    layer = trainer.model.bert.encoder.layer[0].intermediate.dense
    assert int(layer.block_mask.sum()) == layer.block_mask.numel() // 2
    scores = layer.movement_scores
    assert scores.grad is None or torch.isfinite(scores.grad).all()
