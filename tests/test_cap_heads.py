"""Task heads (capsparse.cap.heads): each head's losses against plain torch, batch splitting, logits, the teacher
cache width, contrastive labels, the choice of head and the errors on data or settings the task cannot use."""
import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset, tiny_qa_bert, tiny_qa_dataset
from capsparse.cap import cap_objective
from capsparse.cap.heads import (ClassificationHead, QuestionAnsweringHead, RegressionHead, check_teacher,
                                 is_qa_model, task_head)
from capsparse.cap.losses import QA_PAD_LOGIT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rows(n=6, **extra):
    """A dataset without column_names (a list of dicts), ids in a shuffled order."""
    order = [3, 0, 5, 1, 4, 2][:n]
    return [dict(idx=i, input_ids=[1] * (4 + i), **{k: v[j] for k, v in extra.items()}) for j, i in enumerate(order)]


def test_task_head_is_chosen_from_the_model():
    assert type(task_head(tiny_bert())) is ClassificationHead
    assert type(task_head(tiny_bert(num_labels=1))) is RegressionHead
    assert type(task_head(tiny_bert(num_labels=3, problem_type="regression"))) is RegressionHead
    assert type(task_head(tiny_qa_bert())) is QuestionAnsweringHead
    assert is_qa_model(tiny_qa_bert()) and not is_qa_model(tiny_bert())


def test_classification_losses_match_plain_torch():
    g = torch.Generator().manual_seed(0)
    head = ClassificationHead()
    logits, teacher = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(head.task_loss(logits, labels), F.cross_entropy(logits, labels))
    t = 2.0
    want = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    torch.testing.assert_close(head.kd_loss(logits, teacher, t), want)
    assert head.kd_loss(logits, teacher, t) > 0


def test_regression_losses_match_plain_torch():
    g = torch.Generator().manual_seed(1)
    head = RegressionHead()
    pred, teacher, target = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(head.task_loss(pred, target), ((pred.reshape(-1) - target) ** 2).mean())
    torch.testing.assert_close(head.kd_loss(pred, teacher, 2.0), ((pred - teacher) ** 2).mean())


def test_qa_losses_match_plain_torch():
    g = torch.Generator().manual_seed(2)
    head = QuestionAnsweringHead()
    logits, teacher = torch.randn(3, 7, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    positions = torch.tensor([[1, 3], [9, 9], [0, 6]])  # the second lies outside [0, 7): ignored, as BERT does
    ce_s = F.cross_entropy(logits[[0, 2], :, 0], positions[[0, 2], 0])
    ce_e = F.cross_entropy(logits[[0, 2], :, 1], positions[[0, 2], 1])
    torch.testing.assert_close(head.task_loss(logits, positions), (ce_s + ce_e) / 2)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    t, want = 2.0, 0.0
    for b, length in enumerate([5, 4, 5]):  # the teacher is padded to 7; padding and masked positions drop out
        for k in range(2):
            s, z = logits[b, :length, k] / t, teacher[b, :length, k] / t
            want += F.kl_div(F.log_softmax(s, 0), F.softmax(z, 0), reduction="sum")
    mask[0, 5:] = mask[2, 5:] = 0
    torch.testing.assert_close(head.kd_loss(logits, teacher, t, mask), want / 3 / 2 * t * t)


def test_split_and_logits():
    batch = {"input_ids": torch.ones(2, 4), "idx": torch.tensor([1, 0]), "label": torch.tensor([1, 0])}
    inputs, labels, ids = ClassificationHead().split(batch)
    assert set(inputs) == {"input_ids"} and labels.tolist() == [1, 0] and ids.tolist() == [1, 0]
    assert set(batch) == {"input_ids", "idx", "label"}  # the caller's batch is left as it was
    _, labels, _ = ClassificationHead().split(dict(batch, labels=torch.tensor([0, 0])))
    assert labels.tolist() == [0, 0]  # 'labels' wins over 'label'
    qa = dict(batch, start_positions=torch.tensor([2, 3]), end_positions=torch.tensor([[4], [5]]))
    inputs, labels, ids = QuestionAnsweringHead().split(qa)
    assert set(inputs) == {"input_ids"} and labels.tolist() == [[2, 4], [3, 5]] and ids.tolist() == [1, 0]
    assert QuestionAnsweringHead().split({"input_ids": 1, "start_positions": torch.tensor([1])})[1] is None
    logits = torch.randn(2, 3)
    assert ClassificationHead().logits({"logits": logits}) is logits
    assert ClassificationHead().logits((logits,)) is logits
    start, end = torch.randn(2, 6), torch.randn(2, 6)
    stacked = QuestionAnsweringHead().logits({"start_logits": start, "end_logits": end})
    assert torch.equal(stacked[..., 0], start) and torch.equal(stacked[..., 1], end)


def test_qa_cache_logits_have_the_training_width():
    head = QuestionAnsweringHead()
    head.prepare(tiny_cap_config(w_s=0.0, representation="cls"), tiny_qa_dataset(8, min_len=5, max_len=9))
    assert head.width == 9
    logits = torch.randn(2, 6, 2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    cached = head.cache_logits(logits, mask)
    assert cached.shape == (2, 9, 2)
    assert torch.equal(cached[0, :6], logits[0]) and torch.equal(cached[1, :3], logits[1, :3])
    assert (cached[1, 3:] == QA_PAD_LOGIT).all() and (cached[0, 6:] == QA_PAD_LOGIT).all()
    assert head.cache_logits(torch.randn(2, 12, 2), None).shape == (2, 9, 2)
    plain = torch.randn(2, 3)
    assert ClassificationHead().cache_logits(plain, None) is plain


def test_contrastive_labels():
    head = ClassificationHead()
    ids, labels = head.prepare(tiny_cap_config(w_s=1.0), tiny_dataset(8))
    assert torch.equal(head.contrastive_labels(labels), labels.long())
    head.prepare(tiny_cap_config(w_s=0.0), tiny_dataset(8))
    assert head.contrastive_labels(labels) is None
    reg = RegressionHead()
    ids, targets = reg.prepare(tiny_cap_config(w_s=1.0, regression_bins=4), tiny_dataset(16, regression=True))
    edges = torch.quantile(targets.float(), torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(reg.bin_edges, edges)
    bins = reg.contrastive_labels(targets)
    assert torch.equal(bins, torch.bucketize(targets.float(), edges, right=True)) and bins.unique().numel() == 4
    # without CAP nothing compares bins: w_s > 0 needs no regression_bins and gives no labels
    reg = RegressionHead()
    reg.prepare(tiny_cap_config(w_s=10.0, use_cap=False), tiny_dataset(8, regression=True))
    assert reg.bin_edges is None and reg.contrastive_labels(targets) is None
    assert QuestionAnsweringHead().contrastive_labels(torch.zeros(3, 2)) is None


def test_labels_are_read_by_id():
    ds = _rows(labels=[30, 0, 50, 10, 40, 20])
    ids, by_id = ClassificationHead().prepare(tiny_cap_config(), ds)
    assert ids.tolist() == [3, 0, 5, 1, 4, 2] and by_id.tolist() == [0, 10, 20, 30, 40, 50]
    columns = tiny_dataset(8).map(lambda e, i: {"idx": 7 - i}, with_indices=True)
    ids, by_id = ClassificationHead().prepare(tiny_cap_config(), columns)
    assert ids.tolist() == list(range(7, -1, -1)) and by_id.tolist() == columns["labels"][::-1]
    ids, labels = QuestionAnsweringHead().prepare(tiny_cap_config(w_s=0.0, representation="cls"),
                                                  _rows(start_positions=[1] * 6, end_positions=[2] * 6))
    assert sorted(ids.tolist()) == list(range(6)) and labels is None


@pytest.mark.parametrize("head,data,cfg,match", [
    (ClassificationHead, lambda: tiny_dataset(8, with_idx=False), {}, "expected an 'idx' column"),
    (ClassificationHead, lambda: [{"labels": 1}], {}, "expected each example to have 'idx'"),
    (ClassificationHead, lambda: tiny_dataset(8).remove_columns(["labels"]), {}, "expected a 'labels' column"),
    (ClassificationHead, lambda: tiny_dataset(8).map(lambda e: {"idx": 0}), {}, r"each example id 0\.\.7 exactly"),
    (RegressionHead, lambda: tiny_dataset(8, regression=True), dict(w_s=1.0), "regression_bins=<k>"),
    (QuestionAnsweringHead, lambda: tiny_qa_dataset(8).remove_columns(["end_positions"]), dict(w_s=0.0),
     r"needs \['end_positions'\] columns"),
    (QuestionAnsweringHead, lambda: _rows(start_positions=[1] * 6), dict(w_s=0.0), "needs 'start_positions' and"),
    (QuestionAnsweringHead, lambda: tiny_qa_dataset(8), dict(w_s=1.0), "w_s: supervised positives compare"),
    (QuestionAnsweringHead, lambda: tiny_qa_dataset(8), dict(w_s=0.0, representation="pooler"),
     "representation='pooler': question-answering models have no pooler"),
])
def test_prepare_refuses(head, data, cfg, match):
    with pytest.raises(ValueError, match=match):
        head().prepare(tiny_cap_config(**cfg), data())


def test_settings_without_cap_are_not_checked():
    QuestionAnsweringHead().prepare(tiny_cap_config(use_cap=False, w_s=1.0), tiny_qa_dataset(8))  # no error


def test_check_teacher():
    check_teacher(tiny_bert(seed=1), tiny_bert())
    with pytest.raises(ValueError, match="teacher: expected a question-answering model"):
        check_teacher(tiny_bert(), tiny_qa_bert())
    with pytest.raises(ValueError, match="teacher: expected num_labels=2"):
        check_teacher(tiny_bert(num_labels=3), tiny_bert())
    teacher, student = tiny_bert(seed=1), tiny_bert()
    teacher.config.label2id, student.config.label2id = {"a": 0, "b": 1}, {"b": 0, "a": 1}
    with pytest.raises(ValueError, match="label2id"):
        check_teacher(teacher, student)


def test_cap_objective_takes_the_head():
    g = torch.Generator().manual_seed(3)
    cfg = tiny_cap_config(w_ce=0.3, w_kd=0.7)
    logits, teacher = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    labels, ids = torch.tensor([0, 1, 1, 0]), torch.arange(4)
    default, parts = cap_objective(cfg, logits, labels, ids, None, teacher_logits=teacher)
    with_head, _ = cap_objective(cfg, logits, labels, ids, None, teacher_logits=teacher, head=ClassificationHead())
    torch.testing.assert_close(with_head, default)
    head = ClassificationHead()
    torch.testing.assert_close(default, 0.3 * head.task_loss(logits, labels) + 0.7 * head.kd_loss(logits, teacher, 2.0))
    assert set(parts) == {"ce", "kd"}
    pred, target = torch.randn(4, 1, generator=g), torch.randn(4, generator=g)
    total, _ = cap_objective(cfg, pred, target, ids, None, teacher_logits=teacher[:, :1], head=RegressionHead())
    want = 0.3 * ((pred.reshape(-1) - target) ** 2).mean() + 0.7 * ((pred - teacher[:, :1]) ** 2).mean()
    torch.testing.assert_close(total, want)


def test_regression_trains_without_cap(tmp_path):
    """use_cap=False with the default w_s: no bins are needed and none are formed (the trainer once failed here)."""
    from capsparse.cap.trainer import CAPTrainer
    cfg = tiny_cap_config(use_cap=False, target_sparsity=0.3)
    trainer = CAPTrainer(tiny_bert(num_labels=1), tiny_args(tmp_path, max_steps=3), cfg,
                         tiny_dataset(16, regression=True), teacher=tiny_bert(num_labels=1))
    trainer.train()
    assert type(trainer.head) is RegressionHead and trainer.banks.labels is None
    assert trainer.sparsity_report()["global"] == pytest.approx(0.3, abs=0.01)
