"""CAPTrainer with what a Hugging Face user expects: save_model / from_pretrained, checkpoints that keep the pruned
entries, mixed precision, load_best_model_at_end (CPU, tiny random BERTs)."""
import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap.trainer import CAPTrainer
from capsparse.surgery import sparse_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _batch(n=6):
    ds = tiny_dataset(n, seed=3)
    return {k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_save_model_round_trips_the_pruned_model(tmp_path):
    import transformers
    from safetensors import safe_open

    from capsparse import from_pretrained
    from capsparse.pruning import SCORE_ATTR

    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path / "run", max_steps=8, save_strategy="steps", save_steps=8),
                         tiny_cap_config(target_sparsity=0.5, banks=("prc",)), tiny_dataset(32),
                         teacher=tiny_bert(seed=1))
    trainer.train()
    model = trainer.model.eval()
    with torch.no_grad():
        ref = model(**_batch()).logits
    trainer.save_model(str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith(SCORE_ATTR)]  # training-only scores are left out
    assert any(n.endswith(SCORE_ATTR) for n, _ in model.named_parameters())  # and stay on the model
    loaded = from_pretrained(tmp_path / "hf", backend="reference")
    assert len(sparse_layers(loaded)) == 12
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(loaded)):
        assert torch.equal(a.element_mask(), b.element_mask())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch()).logits, ref, rtol=1e-5, atol=1e-6)
        plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(plain(**_batch()).logits, ref, rtol=1e-5, atol=1e-6)
    # the checkpoint keeps the pruned entries' values (a resume continues exactly), not W * M
    with safe_open(str(tmp_path / "run" / "checkpoint-8" / "model.safetensors"), framework="pt") as f:
        name, layer = sparse_layers(model)[0]
        saved = f.get_tensor(f"{name}.weight")
    assert torch.equal(saved, layer.weight.detach()) and (saved[~layer.element_mask()] != 0).any()
