"""prc_model: the PrC bank encoded by a given pre-trained model instead of the student before its first update."""
import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.app.commands import prune
from capsparse.app.options import OptionError
from capsparse.cap.trainer import CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trainer(tmp_path, prc_model=None, banks=("prc", "fic"), student_seed=1, **cfg):
    teacher = tiny_bert(seed=1)
    return CAPTrainer(tiny_bert(seed=student_seed), tiny_args(tmp_path, max_steps=1),
                      tiny_cap_config(target_sparsity=0.5, banks=banks, **cfg), tiny_dataset(24), teacher=teacher,
                      prc_model=prc_model)


def _banks_after_one_step(trainer):
    trainer.train()
    ids = torch.arange(trainer.n_examples)
    return trainer.banks["prc"].gather(ids), trainer.banks["fic"].gather(ids)


def test_a_student_that_starts_from_the_teacher_makes_prc_a_copy_of_fic(tmp_path):
    # the official behaviour (prc_model=None): PrC is the student before its first update
    prc, fic = _banks_after_one_step(_trainer(tmp_path))
    assert torch.allclose(prc, fic, atol=1e-6)


def test_prc_model_encodes_the_prc_bank(tmp_path):
    pretrained = tiny_bert(seed=7)
    trainer = _trainer(tmp_path, prc_model=pretrained)
    prc, fic = _banks_after_one_step(trainer)
    assert not torch.allclose(prc, fic, atol=1e-3)  # no longer the teacher's vectors
    # ...but the given model's: the same bank built with that model as the student
    reference = _trainer(tmp_path / "ref", student_seed=7)
    ref_prc, _ = _banks_after_one_step(reference)
    assert torch.allclose(prc, ref_prc, atol=1e-6)
    assert not pretrained.training and not any(p.requires_grad for p in pretrained.parameters())


def test_prc_model_needs_the_prc_bank_and_the_student_width(tmp_path):
    with pytest.raises(ValueError, match="prc_model: given, but the PrC bank is off"):
        _trainer(tmp_path, prc_model=tiny_bert(seed=7), banks=("fic",))
    with pytest.raises(ValueError, match="prc_model: expected hidden_size=32"):
        _trainer(tmp_path, prc_model=tiny_bert(seed=7, hidden=48))


def test_cli_refuses_prc_model_without_cap_before_loading_anything(tmp_path):
    with pytest.raises(OptionError, match="--prc-model: got 'default', but the PrC bank is off"):
        prune(task="sst2", cap=False, method="movement", sparsity=0.9, prc_model="default",
              output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
