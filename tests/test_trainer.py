"""CAPTrainer end to end on tiny random BERTs (CPU): targets, schedule hooks, resume, bad input."""
import os

import pytest
import torch
from transformers import TrainerCallback

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap.trainer import CAP_STATE_NAME, CAPTrainer
from capsparse.pruning.pruners import SALIENCY_BUFFERS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(tmp_path, cfg, teacher="random", n=48, **args):
    model = tiny_bert()
    if teacher == "random":
        teacher = tiny_bert(seed=1)
    trainer = CAPTrainer(model, tiny_args(tmp_path, **args), cfg, tiny_dataset(n), teacher=teacher)
    trainer.train()
    return trainer


def test_end_to_end_movement_with_teacher_finetuning(tmp_path):
    # a random tiny BERT learns the toy task partly through its (random) embeddings: let them train here
    # (freezing them, the default for unstructured methods, is tested in test_cap_protocol.py)
    cfg = tiny_cap_config(target_sparsity=0.7, w_ce=1.0, w_s=1.0, teacher_epochs=4, max_snapshots=2,
                          freeze_embeddings=False)
    trainer = _run(tmp_path, cfg, teacher=None, n=64, num_train_epochs=5, logging_steps=8, learning_rate=3e-3)
    logs = [l for l in trainer.state.log_history if "loss" in l]
    assert {"ce", "kd", "prc_u", "prc_s", "fic_u", "fic_s", "sparsity"} <= set(logs[0])
    assert "snc_u" in logs[-1] and trainer.banks["snc"].count == 2          # R_max = 2: a ring of snapshots
    assert trainer.snapshot_epochs == {1, 2, 3, 4}
    # learns the toy task: the CE drop over TrainingArguments seeds 0-4 was 0.06-0.12 with torch's dropout and with
    # the seed-determined one that sparsify swaps in (means 0.10 / 0.09), so 0.1 was a coin flip on the masks
    assert logs[-1]["ce"] < logs[0]["ce"] - 0.05
    assert logs[-1]["loss"] < max(l["loss"] for l in logs)
    report = trainer.sparsity_report()
    assert report["global"] == pytest.approx(0.7, abs=0.01) and len(report["per_layer"]) == 12
    assert all(abs(v - 0.7) < 0.01 for v in report["per_layer"].values())   # per-matrix top-k
    assert 0 < report["encoder_params"] < report["global"]
    assert os.path.isdir(tmp_path / "teacher") or trainer.teacher is not None
    groups = trainer.optimizer.param_groups
    assert groups[-1]["initial_lr"] == pytest.approx(1e-2) and groups[0]["initial_lr"] == pytest.approx(3e-3)
    assert groups[-1]["weight_decay"] == 0.0 and len(groups[-1]["params"]) == 12


def test_mask_update_once_per_optimizer_step(tmp_path):
    cfg = tiny_cap_config(use_cap=False)
    model = tiny_bert()
    trainer = CAPTrainer(model, tiny_args(tmp_path, max_steps=6, gradient_accumulation_steps=2), cfg,
                         tiny_dataset(48), teacher=tiny_bert(seed=1))
    forwards = []
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *a: forwards.append(1))
    trainer.train()
    assert trainer.pruner.num_updates == 6 + 1        # one per optimizer step, plus the initial masks
    assert len(forwards) >= 12                        # 2 micro-batches per step (and encoding passes)


@pytest.mark.parametrize("method,extra", [("block-movement", dict(block_size=16, block_score_mode="exact")),
                                          ("block-movement", dict(block_size=16, block_score_mode="fast")),
                                          ("magnitude", {})])
def test_other_unstructured_methods_reach_target(tmp_path, method, extra):
    cfg = tiny_cap_config(method=method, target_sparsity=0.5, banks=("fic",), **extra)
    trainer = _run(tmp_path, cfg, max_steps=12)
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=1e-6)
    if method == "block-movement":
        layer = trainer.model.bert.encoder.layer[0].intermediate.dense
        assert layer.block_size == (16, 16) and int(layer.block_mask.sum()) == layer.block_mask.numel() // 2


def test_soft_movement_reports_reached_sparsity(tmp_path):
    cfg = tiny_cap_config(method="soft-movement", target_sparsity=0.5, soft_lambda_final=400.0, banks=("prc",),
                          score_lr=0.3, sparsity_tolerance=0.5)
    trainer = _run(tmp_path, cfg, max_steps=20)
    report = trainer.last_sparsity_report
    assert report is not None and 0.0 < report["global"] < 1.0
    layers = [m for m in trainer.model.modules() if hasattr(m, "mask") and hasattr(m, "movement_scores")]
    measured = 1 - sum(int(m.mask.sum()) for m in layers) / sum(m.mask.numel() for m in layers)
    assert report["global"] == pytest.approx(measured) and len(layers) == 12
    for m in layers:  # the last update used the final threshold 0.1, with the 0.5% floor
        expected = torch.sigmoid(m.movement_scores.detach()) > 0.1
        if int(expected.sum()) >= int(0.005 * expected.numel()) + 1:
            assert torch.equal(m.mask, expected)
    assert any("l1" in l for l in trainer.state.log_history)
    cfg = tiny_cap_config(method="soft-movement", target_sparsity=0.9, soft_lambda_final=0.0, banks=("prc",))
    with pytest.warns(UserWarning, match="soft movement"):
        _run(tmp_path / "b", cfg, max_steps=4)


def test_first_order_structured_and_compaction(tmp_path):
    cfg = tiny_cap_config(method="first-order", target_sparsity=0.5, structured_steps=2, epochs_per_step=1,
                          snapshot_mode="eval")
    trainer = _run(tmp_path, cfg, num_train_epochs=2)
    masks = trainer.structured_masks
    assert trainer.stage == 2 and trainer.banks["prc"].count == 1 and trainer.banks["snc"].count == 1
    assert int((masks.head_masks() == 0).sum()) == 4 and int((masks.neuron_masks() == 0).sum()) == 64
    assert bool((masks.head_masks().sum(1) >= 1).all())
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=1e-6)
    model = trainer.model.eval()
    batch = {k: torch.tensor(v) for k, v in tiny_dataset(4)[:4].items() if k not in ("idx", "labels")}
    with torch.no_grad():
        masked = model(**batch).logits
    removed = trainer.compact()
    assert removed == {"heads": 4, "neurons": 64}
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["learned", "saliency"])
def test_resume_equals_uninterrupted(tmp_path, criterion):
    """saliency: its EMA statistics are model buffers, so they travel in the checkpoint."""
    cfg = tiny_cap_config(target_sparsity=0.6, w_s=1.0, score_criterion=criterion)

    def make(out, callbacks=None):
        return CAPTrainer(tiny_bert(), tiny_args(out, max_steps=12, save_strategy="steps", save_steps=6), cfg,
                          tiny_dataset(40), teacher=tiny_bert(seed=1), callbacks=callbacks)

    full = make(tmp_path / "a")
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-6"
    assert (ckpt / CAP_STATE_NAME).is_file()
    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed.banks["snc"].count == full.banks["snc"].count
    if criterion == "saliency":  # the check can fail: statistics lost at the resume (zeroed as it begins) differ
        statistics = [k for k in a if k.endswith(SALIENCY_BUFFERS)]
        assert statistics
        lost = make(tmp_path / "c", callbacks=[_ZeroOnTrainBegin(SALIENCY_BUFFERS)])
        lost.train(resume_from_checkpoint=str(ckpt))
        c = lost.model.state_dict()
        assert any(not torch.allclose(c[k], a[k], rtol=1e-5, atol=1e-6) for k in statistics)


class _ZeroOnTrainBegin(TrainerCallback):
    """Zeroes the model buffers whose names end with ``suffixes`` when training (or a resume) begins."""

    def __init__(self, suffixes):
        self.suffixes = tuple(suffixes)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith(self.suffixes):
                    buf.zero_()


def test_prune_model_convenience(tmp_path):
    from capsparse.cap import prune_model
    from capsparse.pruning import SCORE_ATTR
    model, report = prune_model(tiny_bert(), tiny_dataset(32), tiny_cap_config(target_sparsity=0.5, banks=("prc",)),
                                output_dir=str(tmp_path), teacher=tiny_bert(seed=1), max_steps=8, use_cpu=True,
                                per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    assert report["global"] == pytest.approx(0.5, abs=1e-6)
    assert not any(n.endswith(SCORE_ATTR) for n, _ in model.named_parameters())


def test_structured_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_cap_config(method="first-order", target_sparsity=0.5, structured_steps=2, epochs_per_step=1,
                          snapshot_mode="eval")

    def make(out):
        return CAPTrainer(tiny_bert(), tiny_args(out, max_steps=12, save_strategy="steps", save_steps=4), cfg,
                          tiny_dataset(32), teacher=tiny_bert(seed=1))

    full = make(tmp_path / "a")
    full.train()
    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))   # before the second pruning step
    assert resumed.stage == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(resumed.banks["snc"].data, full.banks["snc"].data)


# -- bad input ---------------------------------------------------------------------------------------------
def test_teacher_label_mismatch(tmp_path):
    with pytest.raises(ValueError, match="num_labels"):
        CAPTrainer(tiny_bert(), tiny_args(tmp_path), tiny_cap_config(), tiny_dataset(16),
                   teacher=tiny_bert(num_labels=3))
    teacher = tiny_bert()
    teacher.config.label2id = {"yes": 1, "no": 0}
    teacher.config.id2label = {1: "yes", 0: "no"}
    student = tiny_bert()
    student.config.label2id = {"no": 1, "yes": 0}
    with pytest.raises(ValueError, match="label2id"):
        CAPTrainer(student, tiny_args(tmp_path), tiny_cap_config(), tiny_dataset(16), teacher=teacher)
    CAPTrainer(student, tiny_args(tmp_path), tiny_cap_config(), tiny_dataset(16), teacher=tiny_bert())  # LABEL_i ok


def test_dataset_without_idx(tmp_path):
    with pytest.raises(ValueError, match="'idx'"):
        CAPTrainer(tiny_bert(), tiny_args(tmp_path), tiny_cap_config(), tiny_dataset(16, with_idx=False),
                   teacher=tiny_bert())
    bad = tiny_dataset(16).map(lambda e: {"idx": e["idx"] + 1})
    with pytest.raises(ValueError, match="0..15"):
        CAPTrainer(tiny_bert(), tiny_args(tmp_path), tiny_cap_config(), bad, teacher=tiny_bert())


def test_unreachable_sparsity(tmp_path):
    with pytest.raises(ValueError, match="unreachable"):
        CAPTrainer(tiny_bert(), tiny_args(tmp_path), tiny_cap_config(method="block-movement", block_size=16,
                                                                     target_sparsity=0.999),
                   tiny_dataset(16), teacher=tiny_bert())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        tiny_cap_config(target_sparsity=1.0)
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=4), tiny_cap_config(schedule_warmup=11000,
                                                                                       schedule_unit="steps"),
                         tiny_dataset(16), teacher=tiny_bert())
    with pytest.raises(ValueError, match="pruning window is empty"):
        trainer.train()


def test_missed_target_fails_loudly(tmp_path):
    cfg = tiny_cap_config(target_sparsity=0.5, use_cap=False)
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=3), cfg, tiny_dataset(16), teacher=tiny_bert())
    trainer.pruner._update = lambda value: None   # a pruner that never prunes: the end check must catch it
    with pytest.raises(RuntimeError, match="misses target_sparsity"):
        trainer.train()


def test_bank_too_big_for_memory(tmp_path, monkeypatch):
    import capsparse.cap.banks as banks
    monkeypatch.setattr(banks, "available_memory", lambda device: 1024)
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=2), tiny_cap_config(), tiny_dataset(16),
                         teacher=tiny_bert())
    with pytest.raises(MemoryError, match="banks: need"):
        trainer.train()


def test_regression_with_supervised_positives(tmp_path):
    ds = tiny_dataset(16, regression=True)
    with pytest.raises(ValueError, match="regression"):
        CAPTrainer(tiny_bert(num_labels=1), tiny_args(tmp_path), tiny_cap_config(w_s=10.0), ds,
                   teacher=tiny_bert(num_labels=1))
    trainer = CAPTrainer(tiny_bert(num_labels=1), tiny_args(tmp_path, max_steps=4),
                         tiny_cap_config(w_s=1.0, regression_bins=2, target_sparsity=0.3), ds,
                         teacher=tiny_bert(num_labels=1))
    trainer.train()
    assert trainer.banks.labels.unique().numel() == 2
