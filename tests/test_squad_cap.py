"""CAP on question answering (SQuAD-style start/end logits): the QA task loss and KD against plain torch, the
unsupervised contrastive terms without labels, and CAPTrainer end to end on a tiny random BertForQuestionAnswering."""
import pytest
import torch
import torch.nn.functional as F

from _tiny import pad_collator, tiny_args, tiny_bert, tiny_cap_config, tiny_qa_bert, tiny_qa_dataset
from capsparse.cap import CAPConfig
from capsparse.cap.banks import BankSet
from capsparse.cap.heads import QuestionAnsweringHead
from capsparse.cap.losses import QA_PAD_LOGIT, cap_objective, qa_kd_loss, qa_task_loss
from capsparse.cap.trainer import CAPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- plain-torch oracles ----------------------------------------------------------------------------------------

def plain_qa_kd(student, teacher, lengths, temperature):
    """Loop over examples and start/end: KL(softmax(t/T) || softmax(s/T)) on the first ``length`` tokens."""
    total = 0.0
    for b, n in enumerate(lengths):
        for c in range(2):
            p_t = torch.softmax(teacher[b, :n, c].double() / temperature, 0)
            log_p_s = torch.log_softmax(student[b, :n, c].double() / temperature, 0)
            total = total + (p_t * (p_t.log() - log_p_s)).sum()
    return total / len(lengths) / 2 * temperature ** 2


def plain_unsupervised_contrastive(query, keys, ids, key_ids, temperature):
    """Official normalisation (cap-method.md 2.4): -(sum_i mean_{k in P_i} l_ik) / sum_i |P_i|; key i (the
    query's own detached copy) is left out of row i's softmax and positives."""
    q = F.normalize(query.double(), dim=1)
    k = F.normalize(keys.double(), dim=1)
    numerator, n_pos = 0.0, 0
    for i in range(q.shape[0]):
        keep = torch.ones(k.shape[0], dtype=torch.bool)
        keep[i] = False
        logits = (q[i] @ k[keep].T) / temperature
        log_prob = logits - torch.logsumexp(logits, 0)
        pos = key_ids[keep] == ids[i]
        numerator = numerator + log_prob[pos].mean()
        n_pos += int(pos.sum())
    return -numerator / n_pos


# -- losses --------------------------------------------------------------------------------------------------

def test_qa_task_loss_is_the_models_own_loss():
    model = tiny_qa_bert().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    start = torch.tensor([2, 5, 40])  # 40 is beyond the sequence: ignored, as in BertForQuestionAnswering
    end = torch.tensor([4, 7, 11])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    logits = torch.stack([out.start_logits, out.end_logits], -1)
    got = qa_task_loss(logits, torch.stack([start, end], 1))
    torch.testing.assert_close(got, out.loss, rtol=1e-6, atol=1e-6)
    # and by hand: start CE over the two valid rows, end CE over all three, averaged
    ce_start = F.cross_entropy(out.start_logits[:2], start[:2])
    ce_end = F.cross_entropy(out.end_logits, end)
    torch.testing.assert_close(got, (ce_start + ce_end) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_qa_kd_matches_plain_torch_on_real_tokens(temperature):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 5, 3]
    student = torch.randn(3, 10, 2, generator=g).requires_grad_(True)
    teacher = 3 * torch.randn(3, 8, 2, generator=g)  # cache width 8 < batch width 10: padded inside
    mask = torch.zeros(3, 10, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    got = qa_kd_loss(student, teacher, temperature, mask)
    want = plain_qa_kd(student.detach(), teacher, lengths, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    got.backward()
    assert torch.isfinite(student.grad).all()
    assert float(student.grad[0, 7:].abs().max()) == 0.0 and float(student.grad[2, 3:].abs().max()) == 0.0
    # padding of any width and value changes nothing (batches are padded dynamically)
    wide = torch.cat([student.detach(), 50 * torch.randn(3, 6, 2, generator=g)], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.long)], 1)
    garbage_teacher = teacher.clone()
    garbage_teacher[2, 3:] = -7.0
    torch.testing.assert_close(qa_kd_loss(wide, garbage_teacher, temperature, wide_mask), got.detach(),
                               rtol=1e-5, atol=1e-7)


def test_qa_kd_without_mask_is_the_official_formula():
    """No padding: the mean of the start and end T^2 * KL(batchmean), as masked_run_squad.py."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, 2, generator=g), torch.randn(4, 9, 2, generator=g)
    temp = 2.0
    kl = [F.kl_div(F.log_softmax(s[..., c] / temp, -1), F.softmax(t[..., c] / temp, -1), reduction="batchmean")
          for c in range(2)]
    torch.testing.assert_close(qa_kd_loss(s, t, temp), (kl[0] + kl[1]) / 2 * temp ** 2, rtol=1e-5, atol=1e-7)


def test_cap_objective_qa_matches_plain_torch():
    """CE + KD + unsupervised PrC/FiC/SnC (no labels anywhere) equals the plain-torch objective, value and gradient."""
    g = torch.Generator().manual_seed(5)
    n, dim, b, length = 6, 8, 3, 9
    cfg = CAPConfig.recipe("squad-unstructured", n_extra_keys=2 * n)  # every example comes back as an extra
    banks = BankSet(n, dim, {"prc": 1, "fic": 1, "snc": 2}, device="cpu", labels=None, seed=0)
    for name, slots in (("prc", 1), ("fic", 1), ("snc", 2)):
        for _ in range(slots):
            banks[name].write(banks[name].new_slot(), torch.arange(n), torch.randn(n, dim, generator=g))
    ids = torch.tensor([4, 0, 2])
    query = torch.randn(b, dim, generator=g).requires_grad_(True)
    logits = torch.randn(b, length, 2, generator=g).requires_grad_(True)
    positions = torch.tensor([[1, 3], [2, 2], [5, 6]])
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:] = 0
    teacher = torch.randn(n, length, 2, generator=g)[ids]
    total, parts = cap_objective(cfg, logits, positions, ids, query, banks=banks, teacher_logits=teacher,
                                 contrastive_labels=None, attention_mask=mask,
                                 head=QuestionAnsweringHead())
    assert set(parts) == {"ce", "kd", "prc_u", "fic_u", "snc_u"}  # no supervised terms without labels

    ce = (F.cross_entropy(logits[..., 0], positions[:, 0]) + F.cross_entropy(logits[..., 1], positions[:, 1])) / 2
    kd = plain_qa_kd(logits, teacher, [9, 7, 9], cfg.kd_temperature)
    want = cfg.w_ce * ce + cfg.w_kd * kd
    for name in ("prc", "fic", "snc"):
        bank = banks[name]
        every = torch.arange(n)
        keys = torch.cat([query.detach(), bank.gather(ids).reshape(-1, dim), bank.gather(every).reshape(-1, dim)])
        key_ids = torch.cat([ids, ids.repeat_interleave(bank.count), every.repeat_interleave(bank.count)])
        term = plain_unsupervised_contrastive(query, keys, ids, key_ids, cfg.temperature)
        torch.testing.assert_close(parts[f"{name}_u"].double(), term.detach(), rtol=1e-5, atol=1e-6)
        want = want + cfg.w_u * term
    torch.testing.assert_close(total.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kd"].double(), kd.detach(), rtol=1e-5, atol=1e-7)
    got_q, got_l = torch.autograd.grad(total, [query, logits])
    want_q, want_l = torch.autograd.grad(want, [query, logits])
    torch.testing.assert_close(got_q.double(), want_q.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_l.double(), want_l.double(), rtol=1e-4, atol=1e-6)


# -- CAPTrainer ------------------------------------------------------------------------------------------------

def qa_config(**kwargs):
    base = dict(w_s=0.0, w_u=0.5, representation="cls", max_snapshots=2)
    base.update(kwargs)
    return tiny_cap_config(**base)


def test_trainer_qa_end_to_end(tmp_path):
    data = tiny_qa_dataset(48, min_len=8, max_len=16)
    model, teacher = tiny_qa_bert(), tiny_qa_bert(seed=1)
    trainer = CAPTrainer(model, tiny_args(tmp_path, num_train_epochs=3, logging_steps=2), qa_config(), data,
                         teacher=teacher, data_collator=pad_collator)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"ce", "kd", "prc_u", "fic_u", "sparsity"} <= set(logs[0])
    assert "snc_u" in logs[-1] and trainer.snapshot_epochs == {1, 2}
    assert not any(k.endswith("_s") for entry in logs for k in entry)  # unsupervised only
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=0.01)

    # the teacher's start/end logits are cached per feature, independent of the batch padding
    cache = trainer.banks.teacher_logits
    assert tuple(cache.shape) == (48, 16, 2)
    teacher.eval()
    with torch.no_grad():
        for i in (0, 7, 31):
            row = data[i]
            n = len(row["input_ids"])
            one = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            out = teacher(**one)
            want = torch.stack([out.start_logits[0], out.end_logits[0]], -1)
            torch.testing.assert_close(cache[row["idx"], :n], want, rtol=1e-4, atol=1e-5)
            assert bool((cache[row["idx"], n:] == QA_PAD_LOGIT).all())
            # FiC bank: the teacher's normalised raw [CLS] state
            cls = teacher.bert(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0, 0]
            torch.testing.assert_close(trainer.banks["fic"].data[row["idx"], 0], F.normalize(cls, dim=0),
                                       rtol=1e-4, atol=1e-5)

    # evaluation mode: the loss is the model's own start/end cross-entropy
    batch = pad_collator([data[i] for i in range(8)])
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        inputs = {k: v for k, v in batch.items() if k != "idx"}
        want = trainer.model(**inputs).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_trainer_qa_finetunes_its_own_teacher(tmp_path):
    trainer = CAPTrainer(tiny_qa_bert(), tiny_args(tmp_path, max_steps=4, logging_steps=2),
                         qa_config(banks=("fic",), teacher_epochs=1),
                         tiny_qa_dataset(32), teacher=None, data_collator=pad_collator)
    trainer.train()
    assert type(trainer.teacher).__name__ == "BertForQuestionAnswering"
    assert trainer.banks.teacher_logits is not None and trainer.banks["fic"].count == 1
    assert any("fic_u" in entry and "kd" in entry for entry in trainer.state.log_history)


def test_trainer_qa_structured_compacts_to_same_logits(tmp_path):
    cfg = qa_config(method="first-order", target_sparsity=0.5, structured_steps=2, banks=("prc", "fic"))
    data = tiny_qa_dataset(32)
    trainer = CAPTrainer(tiny_qa_bert(), tiny_args(tmp_path, max_steps=6), cfg, data, teacher=tiny_qa_bert(seed=1),
                         data_collator=pad_collator)
    trainer.train()
    assert trainer.sparsity_report()["global"] == pytest.approx(0.5, abs=0.05)
    batch = {k: v for k, v in pad_collator([data[i] for i in range(6)]).items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    model = trainer.model.eval()
    with torch.no_grad():
        before = model(**batch)
        trainer.compact()
        after = model(**batch)
    torch.testing.assert_close(after.start_logits, before.start_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.end_logits, before.end_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,teacher,match", [
    (dict(w_s=1.0), "qa", "w_s: supervised positives"),
    (dict(representation="pooler"), "qa", "representation='pooler'"),
    ({}, "classifier", "teacher: expected a question-answering model"),
])
def test_trainer_qa_refuses(tmp_path, kwargs, teacher, match):
    teacher = tiny_qa_bert(seed=1) if teacher == "qa" else tiny_bert(seed=1)
    with pytest.raises(ValueError, match=match):
        CAPTrainer(tiny_qa_bert(), tiny_args(tmp_path), qa_config(**kwargs), tiny_qa_dataset(16), teacher=teacher,
                   data_collator=pad_collator)


def test_trainer_qa_needs_positions(tmp_path):
    data = tiny_qa_dataset(16).remove_columns(["start_positions"])
    with pytest.raises(ValueError, match="start_positions"):
        CAPTrainer(tiny_qa_bert(), tiny_args(tmp_path), qa_config(), data, teacher=tiny_qa_bert(seed=1),
                   data_collator=pad_collator)
