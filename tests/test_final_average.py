"""final_average="ema": the model ends with the EMA of its weights over the final-mask steps, masks its own."""
import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.trainer import CAP_STATE_NAME, CAPTrainer
from capsparse.pruning.pruners import SCORE_ATTR

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trainer(out, average="ema", max_steps=10, decay=0.5, use_cap=True, **args):
    extra = dict(final_average_decay=decay) if average == "ema" else {}
    cfg = tiny_cap_config(target_sparsity=0.5, w_s=1.0, use_cap=use_cap, final_average=average, **extra)
    return CAPTrainer(tiny_bert(), tiny_args(out, max_steps=max_steps, **args), cfg, tiny_dataset(32),
                      teacher=tiny_bert(seed=1))


def _record(trainer):
    """{step: trainable weights after that step's update}, taken before the trainer's own averaging hook."""
    seen = {}
    hook = trainer._average_final_weights

    def recording(step):
        seen[step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                      if p.requires_grad and not n.endswith(SCORE_ATTR)}
        hook(step)
    trainer._average_final_weights = recording
    return seen


@pytest.mark.parametrize("use_cap", [True, False])
def test_model_ends_with_the_ema_of_the_final_mask_steps(tmp_path, use_cap):
    trainer = _trainer(tmp_path, use_cap=use_cap)
    seen = _record(trainer)
    trainer.train()
    end = trainer.schedule.prune_end
    final = sorted(s for s in seen if s >= end)
    assert len(final) >= 2 and len(final) < len(seen)  # some steps averaged, the ramp's not
    expected = {n: t.clone() for n, t in seen[final[0]].items()}
    for s in final[1:]:
        for n in expected:
            expected[n] = 0.5 * expected[n] + 0.5 * seen[s][n]
    got = dict(trainer.model.named_parameters())
    assert any(not torch.equal(seen[final[-1]][n], expected[n]) for n in expected)  # the average is not the last
    for n, t in expected.items():
        torch.testing.assert_close(got[n].detach(), t, rtol=1e-6, atol=1e-7, msg=n)
    assert not any(n.startswith("bert.embeddings") for n in expected)  # frozen: not averaged
    assert abs(trainer.sparsity_report()["global"] - 0.5) <= 0.01  # the masks are the scores' own


def test_none_keeps_the_last_step(tmp_path):
    trainer = _trainer(tmp_path, average="none")
    seen = _record(trainer)
    trainer.train()
    last = seen[max(seen)]
    for n, p in trainer.model.named_parameters():
        if n in last:
            assert torch.equal(p.detach(), last[n]), n


def test_resume_in_the_final_phase_gives_the_same_average(tmp_path):
    full = _trainer(tmp_path / "a", max_steps=12, save_strategy="steps", save_steps=11)
    full.train()
    assert full.schedule.prune_end < 11  # the checkpoint lies inside the averaged steps
    ckpt = tmp_path / "a" / "checkpoint-11"
    state = torch.load(ckpt / CAP_STATE_NAME, weights_only=True)
    assert state["final_average"]["steps"] >= 1
    resumed = _trainer(tmp_path / "b", max_steps=12, save_strategy="steps", save_steps=11)
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    other = _trainer(tmp_path / "c", average="none", max_steps=12)
    with pytest.raises(ValueError, match="final_average=ema.*final_average='none'"):
        other.train(resume_from_checkpoint=str(ckpt))


@pytest.mark.parametrize("kwargs, match", [
    (dict(final_average="swa"), r"final_average.*'none'.*'ema'.*'swa'"),
    (dict(final_average="ema", final_average_decay=1.0), r"final_average_decay.*\(0, 1\).*1.0"),
    (dict(final_average="none", final_average_decay=0.9), r"final_average_decay.*0.9.*'none'"),
    (dict(final_average="ema", method="first-order"), r"final_average.*'first-order'.*no cubic schedule"),
    (dict(final_average="ema", final_warmup=0.0), r"final_average.*final_warmup=0.0"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAPConfig(**kwargs)


def test_load_best_model_at_end_is_refused(tmp_path):
    with pytest.raises(ValueError, match="load_best_model_at_end.*final_average='ema'"):
        _trainer(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
