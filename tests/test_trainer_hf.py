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


# -- mixed precision ----------------------------------------------------------------------------------------

def test_bf16_on_the_cpu_trains_through_the_sparse_layers(tmp_path):
    model = tiny_bert()
    trainer = CAPTrainer(model, tiny_args(tmp_path, bf16=True, max_steps=6), tiny_cap_config(target_sparsity=0.5),
                         tiny_dataset(32), teacher=tiny_bert(seed=1))
    dtypes = []
    layer = sparse_layers(model)[0][1]
    layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    trainer.train()
    assert torch.bfloat16 in dtypes                      # the training forwards ran under bf16 autocast
    assert layer.weight.dtype == torch.float32            # master weights stay fp32
    logs = [l for l in trainer.state.log_history if "loss" in l]
    assert logs and all(torch.isfinite(torch.tensor(l["loss"])) for l in logs)
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=0.01)
    assert not _guard(trainer).skipped_steps


def test_fp16_on_the_cpu_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="fp16=True.*CUDA.*bf16=True"):
        CAPTrainer(tiny_bert(), tiny_args(tmp_path, fp16=True, max_steps=2), tiny_cap_config(), tiny_dataset(16),
                   teacher=tiny_bert(seed=1))


def _guard(trainer):
    from capsparse.guards import NanGuard

    return next(cb.guard for cb in trainer.callback_handler.callbacks if isinstance(getattr(cb, "guard", None),
                                                                                    NanGuard))


@pytest.mark.parametrize("bf16", [False, True])
def test_an_inf_gradient_is_skipped_without_a_scaler(tmp_path, bf16):
    model = tiny_bert()
    trainer = CAPTrainer(model, tiny_args(tmp_path, bf16=bf16, max_steps=6), tiny_cap_config(banks=("prc",)),
                         tiny_dataset(32), teacher=tiny_bert(seed=1))
    head = model.classifier.weight
    calls = []
    head.register_hook(lambda g: g * float("inf") if len(calls.append(1) or calls) == 3 else g)
    before = {}

    class Snapshot(transformers_callback()):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                before.update(w=head.detach().clone())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                before.update(after=head.detach().clone())

    trainer.add_callback(Snapshot())
    trainer.train()
    guard = _guard(trainer)
    assert guard.skipped_steps == [3] and not guard.overflow_steps and guard.amp_scaler is False
    assert torch.equal(before["w"], before["after"])      # the inf step changed nothing
    assert torch.isfinite(head).all() and trainer.state.global_step == 6


def test_scaler_mode_only_with_a_real_scaler():
    from capsparse.guards import NanGuardCallback

    net = torch.nn.Linear(2, 2)
    net.weight.grad = torch.full((2, 2), float("inf"))

    class Wrapped:  # accelerate's optimizer wrapper carries the scaler as .scaler
        def __init__(self, scaler):
            self.scaler = scaler
            self.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    state = type("S", (), {"global_step": 0})()
    cb = NanGuardCallback(policy="skip")
    cb.on_pre_optimizer_step(None, state, None, model=net, optimizer=Wrapped(torch.amp.GradScaler("cpu")))
    assert cb.guard.overflow_steps == [1] and net.weight.grad is not None  # left to the scaler
    cb.on_pre_optimizer_step(None, state, None, model=net, optimizer=Wrapped(torch.amp.GradScaler("cpu",
                                                                                                 enabled=False)))
    assert cb.guard.skipped_steps == [1] and net.weight.grad is None      # no scaler: skipped


def transformers_callback():
    from transformers import TrainerCallback

    return TrainerCallback


# -- load_best_model_at_end ---------------------------------------------------------------------------------

def test_load_best_model_at_end_chooses_a_checkpoint_at_the_target(tmp_path):
    cfg = tiny_cap_config(target_sparsity=0.6, banks=("prc",))
    args = tiny_args(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="sparsity", greater_is_better=False)
    trainer = CAPTrainer(tiny_bert(), args, cfg, tiny_dataset(32), eval_dataset=tiny_dataset(16, seed=5),
                         teacher=tiny_bert(seed=1))
    trainer.train()  # the least sparse checkpoint "wins" on the ramp: it used to be loaded, and train() raised
    evals = {l["step"]: l for l in trainer.state.log_history if "eval_loss" in l}
    assert any(abs(l["eval_sparsity"] - 0.6) > 0.01 for l in evals.values())  # evaluations on the ramp happened
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert abs(evals[best_step]["eval_sparsity"] - 0.6) <= 0.01
    at_target = [l["eval_sparsity"] for l in evals.values() if abs(l["eval_sparsity"] - 0.6) <= 0.01]
    assert evals[best_step]["eval_sparsity"] == min(at_target)
    assert trainer.sparsity_report()["global"] == pytest.approx(0.6, abs=0.01)



# -- logs ---------------------------------------------------------------------------------------------------

def test_logged_components_keep_full_precision(tmp_path):
    trainer = CAPTrainer(tiny_bert(), tiny_args(tmp_path, max_steps=2), tiny_cap_config(banks=("prc",)),
                         tiny_dataset(16), teacher=tiny_bert(seed=1))
    trainer._parts_sum, trainer._parts_n = {"kd": 6.6e-06, "ce": 0.123456789}, 2
    trainer.log({"loss": 1.0, "learning_rate": 3.3e-06})
    last = trainer.state.log_history[-1]
    assert last["kd"] == 3.3e-06 and last["ce"] == 0.123456789 / 2 and last["learning_rate"] == 3.3e-06


def test_mask_turnover_after_a_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = tiny_cap_config(target_sparsity=0.6, banks=("prc",), score_lr=1.0)  # fast scores: masks regrow

    def make(out):
        return CAPTrainer(tiny_bert(), tiny_args(out, max_steps=12, logging_steps=4, save_strategy="steps",
                                                 save_steps=6, learning_rate=3e-3), cfg, tiny_dataset(40),
                          teacher=tiny_bert(seed=1))

    full = make(tmp_path / "a")
    full.train()
    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))

    def turnover(trainer):
        return {l["step"]: l["mask_turnover"] for l in trainer.state.log_history if "mask_turnover" in l}

    a, b = turnover(full), turnover(resumed)
    assert a[8] > 0                                      # the masks still change at the first log after the resume
    assert b[8] == pytest.approx(a[8], abs=1e-9) and b[12] == pytest.approx(a[12], abs=1e-9)
