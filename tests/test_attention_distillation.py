"""Attention-distribution distillation (``CAPConfig.w_attention``): the loss against a plain per-row reference,
padding, the query/key tap, and the trainer path (one teacher forward per step, the term logged and trained)."""
import copy
import math

import pytest
import torch

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.losses import QueryKeyTap, attention_distillation_loss
from capsparse.cap.trainer import CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _reference(student, teacher, d, mask):
    """Per layer, head and real query row: KL(softmax_t || softmax_s) over the real keys, in float64 loops."""
    per_layer = []
    for (qs, ks), (qt, kt) in zip(student, teacher):
        b, length, width = qs.shape
        rows = []
        for i in range(b):
            real = [j for j in range(length) if mask is None or mask[i, j]]
            for h in range(width // d):
                sl = slice(h * d, (h + 1) * d)
                for r in real:
                    ss = torch.stack([qs[i, r, sl].double() @ ks[i, j, sl].double() / math.sqrt(d) for j in real])
                    st = torch.stack([qt[i, r, sl].double() @ kt[i, j, sl].double() / math.sqrt(d) for j in real])
                    pt = torch.softmax(st, 0)
                    rows.append((pt * (torch.log_softmax(st, 0) - torch.log_softmax(ss, 0))).sum())
        per_layer.append(torch.stack(rows).mean())
    return torch.stack(per_layer).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_loss_matches_reference_and_ignores_padding(masked):
    g = torch.Generator().manual_seed(0)
    d, heads = 4, 3

    def qk():
        return (torch.randn(2, 5, heads * d, generator=g), torch.randn(2, 5, heads * d, generator=g))

    student = [tuple(t.requires_grad_(True) for t in qk()) for _ in range(2)]
    teacher = [qk() for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]) if masked else None
    got = attention_distillation_loss(student, teacher, d, mask)
    want = _reference([(q.detach(), k.detach()) for q, k in student], teacher, d, mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    if masked:  # padded queries and keys get no gradient, and moving them changes nothing
        assert student[0][0].grad[1, 2:].abs().sum() == 0 and student[0][1].grad[1, 2:].abs().sum() == 0
        assert student[0][0].grad[1, :2].abs().sum() > 0
        moved = [(q.clone(), k.clone()) for q, k in teacher]
        moved[1][1][1, 3:] += 50.0
        torch.testing.assert_close(attention_distillation_loss(student, moved, d, mask), got)
    assert attention_distillation_loss(teacher, teacher, d, mask).abs() < 1e-6


def test_loss_refuses_mismatched_inputs():
    q = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="same number of layers"):
        attention_distillation_loss([(q, q)], [(q, q)] * 2, 4)
    with pytest.raises(ValueError, match=r"layer 0: expected student and teacher of one shape.*\(1, 2, 8\) and "
                                         r"\(1, 2, 4\)"):
        attention_distillation_loss([(q, q)], [(q[..., :4], q[..., :4])], 4)


def test_config_checks_the_weight():
    with pytest.raises(ValueError, match="w_attention: expected a number >= 0, got -1"):
        CAPConfig(w_attention=-1.0)
    with pytest.raises(ValueError, match="w_attention: 1.0 compares student and teacher attention head by head, "
                                         "but 'first-order' removes heads"):
        CAPConfig(method="first-order", w_attention=1.0)
    assert CAPConfig(w_kd=0.0, w_attention=1.0, use_cap=False).needs_teacher


def test_tap_records_each_layer_only_while_on():
    model = tiny_bert().eval()
    tap = QueryKeyTap(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    model(input_ids=ids)
    with pytest.raises(RuntimeError, match="no query / key output recorded for layers"):
        tap.pairs()
    tap.on = True
    model(input_ids=ids)
    pairs = tap.pairs()
    assert len(pairs) == model.config.num_hidden_layers
    layer0 = model.bert.encoder.layer[0].attention.self
    h = model.bert.embeddings(input_ids=ids)
    torch.testing.assert_close(pairs[0][0], layer0.query(h))
    assert tap.head_dim == model.config.hidden_size // model.config.num_attention_heads
    tap.remove()


def _trainer(tmp_path, w_attention, noise=0.05, **cfg):
    model = tiny_bert()
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():  # a teacher that differs from the student, so the term is not zero
        p.data.add_(noise * torch.randn_like(p))
    config = tiny_cap_config(use_cap=False, w_attention=w_attention, **cfg)
    return CAPTrainer(model, tiny_args(tmp_path, max_steps=4, logging_steps=1), config, tiny_dataset(32),
                      teacher=teacher), teacher


def test_trainer_adds_the_term_with_one_teacher_forward_per_step(tmp_path):
    def teacher_forwards(w_attention):
        trainer, teacher = _trainer(tmp_path / str(w_attention), w_attention=w_attention)
        calls = []
        teacher.register_forward_hook(lambda m, a, out: calls.append(1))
        trainer.train()
        return trainer, teacher, len(calls)

    _, _, without = teacher_forwards(0.0)
    trainer, teacher, with_term = teacher_forwards(1.0)
    assert with_term - without == 4  # the KD cache's encoding pass runs the teacher in both; each step adds one
    logs = [l for l in trainer.state.log_history if "loss" in l]
    assert len(logs) == 4 and all(l["attention"] > 0 for l in logs)
    student_query = trainer.model.bert.encoder.layer[0].attention.self.query
    assert student_query._forward_hooks and teacher.bert.encoder.layer[0].attention.self.query._forward_hooks
    trainer.finalize()  # the exported student and the caller's teacher keep no hooks of the term
    assert not student_query._forward_hooks and not teacher.bert.encoder.layer[0].attention.self.query._forward_hooks


def test_term_alone_trains_the_student_toward_the_teacher(tmp_path):
    trainer, _ = _trainer(tmp_path, w_attention=1.0, noise=0.5, w_ce=0.0, w_kd=0.0, target_sparsity=0.0)
    trainer.args.learning_rate = 3e-2
    trainer.args.max_steps = 30
    trainer.train()
    values = [l["attention"] for l in trainer.state.log_history if "attention" in l]
    assert sum(values[-3:]) < 0.8 * sum(values[:3])  # 0.73 measured; without its gradient it stays near 1


def test_off_by_default_logs_no_term(tmp_path):
    trainer, _ = _trainer(tmp_path, w_attention=0.0)
    trainer.train()
    assert trainer._qk_taps is None and all("attention" not in l for l in trainer.state.log_history)
    assert any("kd" in l for l in trainer.state.log_history)
