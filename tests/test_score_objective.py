"""score_objective="task": the contrastive terms train the weights, and the movement scores see CE + KD only."""
import pytest
import torch
from transformers import TrainerCallback

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.score_objective import TaskScoreGradients
from capsparse.cap.trainer import CAPTrainer
from capsparse.pruning.pruners import SCORE_ATTR

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("scale", [1.0, 0.25, 1024.0])  # plain, 4 accumulation steps, an AMP-style loss scale
def test_hooks_give_scores_the_task_gradient_at_the_trainers_scale(scale):
    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    s = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(4, 3)
    y = x @ (w * torch.sigmoid(s)).t()
    task, contrastive = y.square().mean(), y.sin().sum()
    total = task + contrastive
    want_s = torch.autograd.grad(task, s, retain_graph=True)[0] * scale
    want_w = torch.autograd.grad(total, w, retain_graph=True)[0] * scale
    hooks = TaskScoreGradients()
    hooks.arm(total, task, [s])
    (total * scale).backward()
    torch.testing.assert_close(s.grad, want_s)
    torch.testing.assert_close(w.grad, want_w)  # the weights keep the whole objective's gradient
    # one backward only: a later backward reaches the score unchanged
    s.grad = None
    y2 = x @ (w * torch.sigmoid(s)).t()
    y2.sin().sum().backward()
    torch.testing.assert_close(s.grad, torch.autograd.grad((x @ (w * torch.sigmoid(s)).t()).sin().sum(), s)[0])


class _Grads(TrainerCallback):
    """The score and weight gradients at the first optimizer step."""

    def __init__(self, model):
        self.model, self.scores, self.weights = model, None, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.scores is None:
            layers = [m for m in self.model.modules() if hasattr(m, SCORE_ATTR)]
            self.scores = [getattr(m, SCORE_ATTR).grad.clone() for m in layers]
            self.weights = [m.weight.grad.clone() for m in layers]


def _first_step_grads(tmp_path, accumulation=1, criterion="learned", **cfg):
    model = tiny_bert(dropout=0.0)  # no dropout: the three runs' forwards are the same
    grads = _Grads(model)
    config = tiny_cap_config(target_sparsity=0.5, w_s=1.0, score_criterion=criterion, **cfg)
    # no clipping: the global norm (scores and weights together) would scale the three runs differently
    args = tiny_args(tmp_path, max_steps=1, gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
    trainer = CAPTrainer(model, args, config, tiny_dataset(32), teacher=tiny_bert(seed=1, dropout=0.0),
                         callbacks=[grads])
    trainer.train()
    return grads


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("criterion", ["learned", "saliency"])
def test_trainer_scores_learn_from_the_task_terms_only(tmp_path, accumulation, criterion):
    task = _first_step_grads(tmp_path / "task", accumulation, criterion, score_objective="task")
    full = _first_step_grads(tmp_path / "full", accumulation, criterion)
    plain = _first_step_grads(tmp_path / "plain", accumulation, criterion, use_cap=False)
    def close(a, b):  # relative to the reference's largest entry: the gradients are tiny on a random model
        unit = b.abs().max()
        assert unit > 0
        return torch.allclose(a / unit, b / unit, rtol=1e-4, atol=1e-5)

    for a, b, c in zip(task.scores, plain.scores, full.scores):
        assert close(a, b)          # scores: CE + KD only
        assert not close(a, c)      # the contrastive terms did reach them before
    for a, c in zip(task.weights, full.weights):
        assert close(a, c)          # weights: the whole CAP objective


def test_score_objective_task_needs_scores_and_contrastive_terms():
    assert CAPConfig(score_objective="task").score_objective == "task"
    with pytest.raises(ValueError, match="score_objective: expected one of"):
        CAPConfig(score_objective="scores")
    with pytest.raises(ValueError, match="score_objective: 'task'.*no contrastive terms"):
        CAPConfig(score_objective="task", use_cap=False)
    with pytest.raises(ValueError, match="score_objective: 'task'.*no movement scores"):
        CAPConfig(method="magnitude", score_objective="task")
