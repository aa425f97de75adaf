"""NaN/inf guards (policies, messages naming layer and step, GradScaler mode, Trainer callback) and the CAP
contrastive loss's finiteness at low temperature and with duplicate or zero vectors."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from capsparse import guards
from capsparse.nn import SparseLinear
from capsparse.ops import cap_contrastive_loss

CPU_BACKENDS = ["reference", "cpu"]  # CPU paths never skip: a missing cpu backend fails


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = SparseLinear(16, 16, block_size=16)
        self.fc2 = nn.Linear(16, 2)
        self.movement_scores = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).sum() + self.movement_scores.sum()


def test_check_loss_policies(caplog):
    assert guards.check_loss(torch.tensor(1.0), step=3)
    with pytest.raises(guards.NonFiniteError, match=r"non-finite loss at step 7: loss \(value nan\)"):
        guards.check_loss(torch.tensor(float("nan")), step=7)
    with caplog.at_level(logging.WARNING, logger="capsparse.guards"):
        assert not guards.check_loss(torch.tensor(float("inf")), step=8, policy="skip")
    assert "step 8" in caplog.text
    with pytest.raises(ValueError, match="policy"):
        guards.check_loss(torch.tensor(1.0), policy="ignore")


def test_gradient_guard_names_the_layer_and_step():
    model = Tiny()
    model(torch.randn(3, 16)).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    with pytest.raises(guards.NonFiniteError) as exc:
        guards.check_gradients(model, step=12)
    assert "fc1.weight" in str(exc.value) and "step 12" in str(exc.value) and "1 NaN" in str(exc.value)
    assert "fc2" not in str(exc.value)


def test_skip_policy_leaves_params_and_optimizer_state_unchanged():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 16)).backward()
    opt.step()
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    model(torch.randn(3, 16)).backward()
    model.fc2.bias.grad[1] = float("inf")
    guard = guards.NanGuard("skip")
    assert not guard.check_gradients(model, step=2, optimizer=opt)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[id(p)], s["exp_avg"]) for p, s in opt.state.items())
    assert guard.skipped_steps == [2]


def test_consecutive_skips_eventually_stop():
    guard = guards.NanGuard("skip", max_consecutive_skips=3)
    nan = torch.tensor(float("nan"))
    assert not guard.check_loss(nan, 1)
    assert not guard.check_loss(nan, 2)
    with pytest.raises(guards.NonFiniteError, match="3 consecutive steps"):
        guard.check_loss(nan, 3)
    guard = guards.NanGuard("skip", max_consecutive_skips=2)
    guard.check_loss(nan, 1)
    guard.check_loss(torch.tensor(0.0), 2)
    guard.ok()
    guard.check_loss(nan, 3)  # the streak was reset: no raise


def test_scores_and_parameters_always_raise():
    model = Tiny()
    guard = guards.NanGuard("skip")
    guard.check_scores(model, 5)
    with torch.no_grad():
        model.movement_scores[2] = float("inf")
    with pytest.raises(guards.NonFiniteError, match=r"non-finite score at step 5: movement_scores \(0 NaN and 1 inf"):
        guard.check_scores(model, 5)
    with pytest.raises(guards.NonFiniteError, match="movement_scores"):
        guard.check_parameters(model, 5)
    with pytest.raises(guards.NonFiniteError, match="bank.snc"):
        guards.check_values({"bank.snc": torch.tensor([0.0, float("nan")])}, 9, what="bank entry")


def test_fp16_scaler_mode_defers_overflow_to_the_scaler():
    model = Tiny()
    model(torch.randn(3, 16)).backward()
    model.fc1.weight.grad.fill_(float("inf"))
    guard = guards.NanGuard("stop", amp_scaler=True, min_scale=1.0)
    assert not guard.check_gradients(model, 4, scaler_scale=65536.0)  # an overflow: the scaler skips the step
    assert guard.overflow_steps == [4]
    assert model.fc1.weight.grad is not None  # untouched: GradScaler.step must see the infs
    with pytest.raises(guards.NonFiniteError, match="fc1.weight"):
        guard.check_gradients(model, 5, scaler_scale=0.5)  # scale collapsed: persistent overflow


def test_grad_scaler_skips_the_step_on_overflow():
    """The interplay the scaler mode relies on: GradScaler.step skips optimizer.step when grads hold inf."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = model.weight.detach().clone()
    loss = model(torch.full((2, 4), 1e38)).sum()
    scaler.scale(loss).backward()
    guard = guards.NanGuard("stop", amp_scaler=True)
    assert not guard.check_gradients(model, 1, scaler_scale=scaler.get_scale)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight, before) and scaler.get_scale() < 2.0 ** 16


def _trainer(tmp_path, policy, poison_step):
    import transformers

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = SparseLinear(16, 16, block_size=16)
            self.head = nn.Linear(16, 2)
            self.calls = 0

        def forward(self, x, labels):
            self.calls += 1
            h = self.fc1(x)
            if self.calls == poison_step:
                h = h * float("nan")
            logits = self.head(torch.relu(h))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    data = [{"x": torch.randn(16), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                                          report_to="none", save_strategy="no", use_cpu=True, learning_rate=1e-2,
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    model = Net()
    cb = guards.NanGuardCallback(policy=policy)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    return trainer, model, cb


def test_trainer_callback_skip_and_stop(tmp_path):
    trainer, model, cb = _trainer(tmp_path / "skip", "skip", poison_step=3)
    trainer.train()
    assert cb.guard.skipped_steps == [3]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    trainer, model, cb = _trainer(tmp_path / "stop", "stop", poison_step=2)
    with pytest.raises(guards.NonFiniteError, match=r"fc1\.weight.*|head\.weight.*") as exc:
        trainer.train()
    assert "step 2" in str(exc.value)


# ----------------------------------------------------------------------------------------------------------
# the CAP contrastive loss stays finite
# ----------------------------------------------------------------------------------------------------------


def _loss_and_grad(q, k, backend, temperature=0.1, normalization="official", exclude=True):
    q = q.clone().requires_grad_(True)
    b = q.shape[0]
    qi = torch.arange(b)
    ki = torch.cat([qi, qi, torch.arange(k.shape[0] - 2 * b) % b]) if k.shape[0] >= 2 * b else torch.arange(k.shape[0]) % b
    ql, kl = qi % 2, ki % 2
    ex = torch.arange(b) if exclude and k.shape[0] >= b else None
    lu, ls = cap_contrastive_loss(q, k, qi, ki, ql, kl, temperature=temperature, normalization=normalization,
                                  exclude_index=ex, backend=backend)
    (lu + ls).backward()
    return lu, ls, q.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.05, 0.02, 0.01])
@pytest.mark.parametrize("normalization", ["official", "supcon"])
def test_contrastive_finite_at_low_temperature(backend, temperature, normalization):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(8, 32, generator=g) * 50  # large norms: normalisation must come first
    k = torch.cat([q.detach(), torch.randn(40, 32, generator=g) * 1e-3])
    lu, ls, grad = _loss_and_grad(q, k, backend, temperature, normalization)
    assert torch.isfinite(lu) and torch.isfinite(ls) and torch.isfinite(grad).all()
    assert lu > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["duplicate_keys", "duplicate_queries", "zero_queries", "zero_keys", "all_zero",
                                  "single_excluded_key", "fp16_inputs", "tiny_norms"])
def test_contrastive_finite_on_degenerate_vectors(backend, case):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 16, generator=g)
    k = torch.randn(12, 16, generator=g)
    if case == "duplicate_keys":
        k = k[:1].repeat(12, 1)
    elif case == "duplicate_queries":
        q = q[:1].repeat(4, 1)
        k = torch.cat([q, q, k[:4]])
    elif case == "zero_queries":
        q = torch.zeros_like(q)
    elif case == "zero_keys":
        k[::2] = 0
    elif case == "all_zero":
        q, k = torch.zeros_like(q), torch.zeros_like(k)
    elif case == "single_excluded_key":  # the only key is the row's own excluded copy: no denominator at all
        q, k = q[:1], q[:1].clone()
    elif case == "fp16_inputs":
        q, k = q.half(), k.half()
    elif case == "tiny_norms":
        q, k = q * 1e-30, k * 1e-30
    for temperature in (0.1, 0.01):
        lu, ls, grad = _loss_and_grad(q, k, backend, temperature)
        assert torch.isfinite(lu), (case, temperature, lu)
        assert torch.isfinite(ls), (case, temperature, ls)
        assert torch.isfinite(grad).all(), (case, temperature)
