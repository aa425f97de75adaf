"""The official protocol choices CAPTrainer makes: frozen embeddings for unstructured methods, and CAP-f's
importance pass at the training batch size."""
import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.trainer import CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("method,extra", [("movement", {}), ("block-movement", dict(block_size=16)),
                                          ("magnitude", {}), ("soft-movement", {})])
def test_unstructured_methods_freeze_embeddings_by_default(tmp_path, method, extra):
    model = tiny_bert()
    emb_before, enc_before = _snapshot(model.bert.embeddings), _snapshot(model.bert.encoder)
    cfg = tiny_cap_config(method=method, target_sparsity=0.5, banks=("fic",), **extra)
    assert cfg.freeze_embeddings is None and cfg.embeddings_frozen
    trainer = CAPTrainer(model, tiny_args(tmp_path, max_steps=3), cfg, tiny_dataset(32), teacher=tiny_bert(seed=1))
    trainer.train()
    for n, p in model.bert.embeddings.named_parameters():
        assert not p.requires_grad and torch.equal(p, emb_before[n]), n
    moved = [n for n, p in model.bert.encoder.named_parameters() if n in enc_before and not torch.equal(p, enc_before[n])]
    assert len(moved) > len(enc_before) // 2  # the encoder trains
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.bert.embeddings.parameters())


def test_freeze_embeddings_off_trains_them(tmp_path):
    model = tiny_bert()
    before = _snapshot(model.bert.embeddings)
    cfg = tiny_cap_config(target_sparsity=0.5, banks=("fic",), freeze_embeddings=False)
    CAPTrainer(model, tiny_args(tmp_path, max_steps=3), cfg, tiny_dataset(32), teacher=tiny_bert(seed=1)).train()
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, before["word_embeddings.weight"])


def test_structured_default_keeps_embeddings_trainable():
    assert not CAPConfig(method="first-order").embeddings_frozen
    assert CAPConfig(method="first-order", freeze_embeddings=True).embeddings_frozen
    with pytest.raises(ValueError, match="freeze_embeddings"):
        CAPConfig(freeze_embeddings="yes")


@pytest.mark.parametrize("configured,expected", [(None, 8), (4, 4)])
def test_first_order_importance_pass_uses_training_batch_size(tmp_path, monkeypatch, configured, expected):
    from capsparse.pruning.structured import StructuredMasks

    seen = []
    original = StructuredMasks.accumulate_importance

    def spy(self, loss_fn, batches):
        def counted():
            for b in batches:
                seen.append(int(b["input_ids"].shape[0]))
                yield b
        return original(self, loss_fn, counted())

    monkeypatch.setattr(StructuredMasks, "accumulate_importance", spy)
    cfg = tiny_cap_config(method="first-order", target_sparsity=0.5, structured_steps=1, epochs_per_step=1,
                          snapshot_mode="eval", importance_batch_size=configured)
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=8,
                                                per_device_eval_batch_size=16),
                         cfg, tiny_dataset(32), teacher=tiny_bert(seed=1))
    trainer.train()
    assert seen and max(seen) == expected and sum(seen) == 32
    with pytest.raises(ValueError, match="importance_batch_size"):
        tiny_cap_config(importance_batch_size=0)
