"""contrastive_phase="pruning": the contrastive terms apply until the cubic schedule's final mask, then stop."""
import pytest

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.trainer import CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _contrastive_steps(tmp_path, phase):
    """{step: whether that step's objective had contrastive terms}, and the trainer."""
    config = tiny_cap_config(target_sparsity=0.5, w_s=1.0, contrastive_phase=phase)
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=10), config, tiny_dataset(32),
                         teacher=tiny_bert(seed=1))
    seen, objective = {}, trainer._objective

    def recording(*args, **kwargs):
        out = objective(*args, **kwargs)
        seen[trainer.state.global_step] = out[3] is not None
        return out
    trainer._objective = recording
    trainer.train()
    return seen, trainer


def test_pruning_phase_stops_the_contrastive_terms_at_the_final_mask(tmp_path):
    seen, trainer = _contrastive_steps(tmp_path / "pruning", "pruning")
    end = trainer.schedule.prune_end
    assert 0 < end < 10
    assert all(on for step, on in seen.items() if 0 < step < end)  # banks are ready from the first update
    assert not any(on for step, on in seen.items() if step >= end)
    assert any(step >= end for step in seen)
    full, official = _contrastive_steps(tmp_path / "all", "all")
    assert all(on for step, on in full.items() if step > 0)
    assert any(step >= end for step in full)
    # 4 steps per epoch, final mask from step 8: no SnC snapshot once the contrast is over
    per_epoch = trainer._steps_per_epoch
    assert official.snapshot_epochs == {e for e in (1, 2) if e * per_epoch < 10}
    assert trainer.snapshot_epochs == {e for e in official.snapshot_epochs if e * per_epoch < end}
    assert trainer.snapshot_epochs != official.snapshot_epochs


@pytest.mark.parametrize("cfg", [dict(method="first-order"), dict(use_cap=False)])
def test_pruning_phase_needs_a_cubic_schedule_and_contrastive_terms(cfg):
    with pytest.raises(ValueError, match="contrastive_phase"):
        CAPConfig(contrastive_phase="pruning", **cfg)


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="contrastive_phase.*'all'.*'pruning'.*'always'"):
        CAPConfig(contrastive_phase="always")
