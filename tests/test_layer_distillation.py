"""Layer-wise hidden-state distillation (``CAPConfig.w_hidden``): the loss against a plain reference, padding, and
the trainer path (teacher forward per step, the term in the objective and its gradient)."""
import copy

import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.losses import hidden_distillation_loss
from capsparse.cap.trainer import CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _reference(student, teacher, mask):
    """Per layer: the mean over real tokens and features of the squared difference; then the mean over layers."""
    per_layer = []
    for hs, ht in zip(student, teacher):
        rows = [((hs[b, t] - ht[b, t]) ** 2).mean() for b in range(hs.shape[0]) for t in range(hs.shape[1])
                if mask is None or mask[b, t]]
        per_layer.append(torch.stack(rows).mean())
    return torch.stack(per_layer).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_loss_matches_reference_and_ignores_padding(masked):
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, 8, generator=g, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(3, 5, 8, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]) if masked else None
    got = hidden_distillation_loss(student, teacher, mask)
    want = _reference([s.detach() for s in student], teacher, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    if masked:  # padding positions get no gradient, and changing them changes nothing
        assert student[0].grad[2, 1:].abs().sum() == 0 and student[0].grad[2, 0].abs().sum() > 0
        moved = [t.clone() for t in teacher]
        moved[1][1, 3:] += 100.0
        torch.testing.assert_close(hidden_distillation_loss(student, moved, mask), got)
    assert hidden_distillation_loss(teacher, teacher, mask) == 0


def test_loss_refuses_mismatched_layers():
    with pytest.raises(ValueError, match="same number of layers"):
        hidden_distillation_loss([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, 3)] * 2)


def test_config_refuses_negative_weight():
    with pytest.raises(ValueError, match="w_hidden: expected a number >= 0, got -1"):
        CAPConfig(w_hidden=-1.0)


def _trainer(tmp_path, w_hidden, **cfg):
    model = tiny_bert()
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():  # a teacher that differs from the student, so the term is not zero
        p.data.add_(0.05 * torch.randn_like(p))
    config = tiny_cap_config(use_cap=False, w_hidden=w_hidden, **cfg)
    return CAPTrainer(model, tiny_args(tmp_path, max_steps=4, logging_steps=1), config, tiny_dataset(32),
                      teacher=teacher), teacher


def _record_teacher_calls(teacher):
    """The ``output_hidden_states`` argument of every teacher forward."""
    calls = []
    teacher.register_forward_hook(lambda m, a, kw, out: calls.append(kw.get("output_hidden_states")),
                                  with_kwargs=True)
    return calls


def test_trainer_adds_the_term_and_runs_the_teacher_each_step(tmp_path):
    trainer, teacher = _trainer(tmp_path, w_hidden=1.0)
    calls = _record_teacher_calls(teacher)
    trainer.train()
    logs = [l for l in trainer.state.log_history if "loss" in l]
    assert len(logs) == 4 and all(l["hidden"] > 0 for l in logs)
    assert calls.count(True) == 4  # one teacher forward with hidden states per training step


def test_term_alone_trains_the_student_toward_the_teacher(tmp_path):
    # CE and KD off: only the layer term moves the weights, and it must shrink
    trainer, _ = _trainer(tmp_path, w_hidden=1.0, w_ce=0.0, w_kd=0.0, target_sparsity=0.0)
    trainer.args.learning_rate = 1e-2
    trainer.args.max_steps = 12
    trainer.train()
    hidden = [l["hidden"] for l in trainer.state.log_history if "hidden" in l]
    assert hidden[-1] < 0.7 * hidden[0]


def test_off_by_default_means_no_teacher_hidden_states(tmp_path):
    trainer, teacher = _trainer(tmp_path, w_hidden=0.0)
    calls = _record_teacher_calls(teacher)
    trainer.train()
    assert calls  # the teacher did run (the KD cache's encoding pass), so the hook saw its calls
    assert True not in calls and all("hidden" not in l for l in trainer.state.log_history)
    assert any("kd" in l for l in trainer.state.log_history)  # the logs this checks do carry loss parts
