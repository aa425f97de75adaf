"""One pruning-method interface (capsparse.pruning.method): unstructured, block, soft and structured methods are
driven through the same calls, each reaches its target on its own schedule, and its report agrees with a direct
count of the removed weights. Also the cubic schedule's names (density vs sigmoid threshold)."""
import pytest
import torch

from _tiny import tiny_bert
from capsparse import sparsify
from capsparse.pruning import build_pruner
from capsparse.pruning.method import PruningMethod, SoftMovementPruning, StructuredPruning, TopKPruning
from capsparse.pruning.schedule import CubicSchedule, cubic_threshold, cubic_value
from capsparse.surgery import sparse_layers

TOTAL, PER_EPOCH = 40, 10


def _drive(method: PruningMethod, total=TOTAL, loss=None):
    """The loop a trainer runs, with a fake backward that gives every score a gradient."""
    method.begin(total, PER_EPOCH)
    method.step(0)
    for step in range(total):
        method.step_begin(step)
        if loss is not None:
            loss().backward()
        method.before_optimizer_step()
        with torch.no_grad():  # an "optimizer step" on the scores
            for p in method.score_parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
                    p.grad = None
        method.step(step + 1)
    return method


def _direct_count(model):
    kept = total = 0
    for _, layer in sparse_layers(model):
        mask = layer.mask if layer.block_size is None else layer.block_mask.repeat_interleave(
            layer.block_size[0], 0).repeat_interleave(layer.block_size[1], 1)
        kept += int(mask.sum())
        total += mask.numel()
    return 1 - kept / total


def _loss(model):
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    return lambda: model(input_ids=ids).logits.pow(2).mean()


@pytest.mark.parametrize("name,block_size", [("magnitude", None), ("movement", None), ("block-movement", 16),
                                             ("magnitude", 16)])
def test_top_k_methods_reach_the_target(name, block_size):
    model = tiny_bert()
    sparsify(model, block_size=block_size)
    method = TopKPruning(build_pruner(name, model), 0.75, 0.01, warmup=0.1, unit="fraction", initial_warmup=1,
                         final_warmup=2)
    _drive(method, loss=_loss(model))
    report = method.sparsity_report()
    assert report.sparsity == pytest.approx(0.75, abs=0.01)
    assert report.sparsity == pytest.approx(_direct_count(model), abs=1e-12)
    assert method.density(TOTAL) == pytest.approx(0.25) and method.density(0) == 1.0
    assert method.reg_lambda(TOTAL) == 0.0 and method.regularization() is None
    assert method.pruner.num_updates == TOTAL + 1  # once at the start, once per optimizer step
    assert (len(method.score_parameters()) == 12) == (name != "magnitude")


def test_soft_movement_schedules_a_sigmoid_threshold():
    model = tiny_bert()
    sparsify(model)
    method = SoftMovementPruning(build_pruner("soft-movement", model, score_init_mode="constant", score_init=0.0),
                                 0.5, 0.01, warmup=0.1, final_sigmoid_threshold=0.5, lambda_final=10.0,
                                 unit="fraction", initial_warmup=1, final_warmup=2)
    assert not method.exact_target
    method.begin(TOTAL, PER_EPOCH)
    assert method.sigmoid_threshold(0) == 0.0 and method.sigmoid_threshold(TOTAL) == 0.5
    assert method.reg_lambda(TOTAL) == pytest.approx(10.0) and method.reg_lambda(0) == 0.0
    with torch.no_grad():  # half of every matrix below sigmoid^-1(0.5) = 0: pruned at the final threshold
        for p in method.score_parameters():
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    method.step(TOTAL)
    assert method.sparsity_report().sparsity == pytest.approx(0.5, abs=0.01)
    assert method.sparsity_report().sparsity == pytest.approx(_direct_count(model), abs=1e-12)
    assert method.regularization() is not None


def test_structured_prunes_in_stages_through_the_same_calls():
    model = tiny_bert(heads=4, intermediate=64)
    calls = []

    def importance_inputs(stage):
        calls.append(("importance", stage))
        return (lambda batch: model(**batch).logits.pow(2).mean()), [{"input_ids": torch.randint(0, 100, (4, 8))}]

    method = StructuredPruning(model, 0.5, steps=2, heads_protected=1, importance_inputs=importance_inputs,
                               before_masks=lambda s: calls.append(("before", s)),
                               after_masks=lambda s: calls.append(("after", s)))
    assert method.stagewise and method.score_parameters() == [] and method.reg_lambda(3) == 0.0
    _drive(method)
    assert method.stage == 2 and calls == [("importance", 0), ("before", 0), ("after", 0),
                                           ("importance", 1), ("before", 1), ("after", 1)]
    heads, neurons = method.masks.head_masks(), method.masks.neuron_masks()
    assert int((heads == 0).sum()) == 4 and int((neurons == 0).sum()) == 64  # half of 2 x 4 heads, 2 x 64 neurons
    report = method.sparsity_report()
    assert report.sparsity == pytest.approx(0.5)
    h = 32  # a direct count: a pruned head removes 4 * d_h * h weights, a pruned neuron 2 * h
    removed = 4 * 4 * 8 * h + 64 * 2 * h
    assert (report.total - report.kept) == removed and report.total == 2 * (4 * h * h + 2 * h * 64)
    assert method.state_dict() == {"stage": 2, "pruner": None}
    fresh = StructuredPruning(tiny_bert(heads=4, intermediate=64), 0.5, steps=2)
    fresh.load_state_dict(method.state_dict())
    assert fresh.stage == 2
    factor = method.lr_factor(TOTAL)  # each stage its own warm-up and decay
    assert factor(0) == 0.0 and factor(2) == 1.0 and factor(20) == 0.0 and factor(22) == 1.0


def test_structured_needs_a_step_per_stage():
    method = StructuredPruning(tiny_bert(), 0.5, steps=9)
    with pytest.raises(ValueError, match="structured_steps: 9 pruning steps need at least as many"):
        method.begin(4, 4)
    with pytest.warns(UserWarning, match="split evenly"):
        StructuredPruning(tiny_bert(), 0.5, steps=2, epochs_per_step=2.0).begin(40, 10, num_train_epochs=3)


def test_state_round_trip_and_unreachable_target():
    model = tiny_bert()
    sparsify(model)
    method = _drive(TopKPruning(build_pruner("magnitude", model), 0.5, 0.01, warmup=0.1, unit="fraction",
                                initial_warmup=1, final_warmup=2))
    state = method.state_dict()
    assert state["stage"] == 0 and state["pruner"]["num_updates"] == TOTAL + 1
    other = TopKPruning(build_pruner("magnitude", model), 0.5, 0.01, warmup=0.1)
    other.load_state_dict(state)
    assert other.pruner.num_updates == TOTAL + 1
    with pytest.raises(ValueError, match="pruning window is empty"):
        TopKPruning(build_pruner("magnitude", model), 0.5, 0.01, warmup=100).begin(TOTAL, PER_EPOCH)
    blocky = tiny_bert()
    sparsify(blocky, block_size=32)
    with pytest.raises(ValueError, match="unreachable"):
        TopKPruning(build_pruner("magnitude", blocky), 0.99, 0.01, warmup=0.1)


def test_cubic_schedule_names():
    assert cubic_value(45, 100, 10, 1.0, 0.1, 2, 3) == cubic_threshold(45, 100, 10, 1.0, 0.1, 2, 3)
    new = CubicSchedule.resolve(100, 0.1, "fraction", initial_value=1.0, final_value=0.1)
    old = CubicSchedule.resolve(100, 0.1, "fraction", initial_threshold=1.0, final_threshold=0.1)
    assert new == old and all(new(s) == old(s) for s in range(0, 101, 5))
    with pytest.raises(ValueError, match="old name final_threshold"):
        CubicSchedule(100, 10.0, initial_value=1.0, final_value=0.1, final_threshold=0.1)
    with pytest.raises(ValueError, match="final_value: expected a number"):
        CubicSchedule(100, 10.0, initial_value=1.0)
