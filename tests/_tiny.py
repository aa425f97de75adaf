"""Tiny random BERT models and datasets for CPU tests (no downloads). Other test files may import these."""
from __future__ import annotations

import torch

torch.set_num_threads(1)  # 2 shared cores: oversubscription makes tiny ops slow


def tiny_config(hidden=32, layers=2, heads=4, intermediate=64, num_labels=2, vocab=100, dropout=0.1, **kwargs):
    from transformers import BertConfig
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=32, num_labels=num_labels,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, type_vocab_size=2,
                      attn_implementation="eager", **kwargs)


def tiny_bert(seed=0, **kwargs):
    from transformers import BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**kwargs))


def tiny_dataset(n=32, seq=16, num_labels=2, vocab=100, seed=0, with_idx=True, regression=False):
    """A learnable toy task: the label is whether token 7 occurs (or the count of 7s for regression)."""
    import datasets
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, seq), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    for i in range(n):  # plant the signal: label c > 0 fills positions 1..8 with token 6 + c
        if labels[i] > 0:
            ids[i, 1:9] = 6 + int(labels[i])
    ids[:, 0] = 1  # [CLS]
    data = {"input_ids": ids.tolist(), "attention_mask": torch.ones(n, seq, dtype=torch.long).tolist(),
            "token_type_ids": torch.zeros(n, seq, dtype=torch.long).tolist()}
    data["labels"] = (labels.float() + 0.1 * torch.randn(n, generator=g)).tolist() if regression else labels.tolist()
    if with_idx:
        data["idx"] = list(range(n))
    return datasets.Dataset.from_dict(data)


def tiny_args(output_dir, **kwargs):
    from transformers import TrainingArguments
    base = dict(output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                learning_rate=1e-3, num_train_epochs=1, logging_steps=5, save_strategy="no", report_to="none",
                seed=0, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    base.update(kwargs)
    return TrainingArguments(**base)


def tiny_cap_config(**kwargs):
    from capsparse.cap import CAPConfig
    base = dict(method="movement", target_sparsity=0.5, schedule_warmup=0.1, schedule_unit="fraction",
                initial_warmup=1, final_warmup=2, n_extra_keys=16, teacher_epochs=1, sparsity_tolerance=0.01)
    base.update(kwargs)
    return CAPConfig(**base)


def tiny_qa_bert(seed=0, **kwargs):
    """A tiny random ``BertForQuestionAnswering`` (start/end logits, no pooler)."""
    from transformers import BertForQuestionAnswering
    torch.manual_seed(seed)
    return BertForQuestionAnswering(tiny_config(**kwargs))


def tiny_qa_dataset(n=32, min_len=8, max_len=16, vocab=100, seed=0, with_idx=True):
    """A learnable toy span task with ragged lengths: the answer span is the run of token 7 (2-4 tokens long)."""
    import datasets
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "start_positions": [], "end_positions": []}
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(10, vocab, (length,), generator=g)
        ids[0] = 1  # [CLS]
        span = int(torch.randint(2, 5, (1,), generator=g))
        start = int(torch.randint(1, length - span + 1, (1,), generator=g))
        ids[start:start + span] = 7
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append([1] * length)
        rows["token_type_ids"].append([0] * length)
        rows["start_positions"].append(start)
        rows["end_positions"].append(start + span - 1)
    if with_idx:
        rows["idx"] = list(range(n))
    return datasets.Dataset.from_dict(rows)


def pad_collator(features):
    """Right-pad ``input_ids`` / ``attention_mask`` / ``token_type_ids`` with 0 to the batch's longest row."""
    width = max(len(f["input_ids"]) for f in features)
    out = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key in ("input_ids", "attention_mask", "token_type_ids"):
            values = [list(v) + [0] * (width - len(v)) for v in values]
        out[key] = torch.tensor(values)
    return out


def write_squad_json(path, n_people=8, seed=0):
    """A hand-made SQuAD v1.1-format file: one paragraph per person, four questions each (``4 * n_people``)."""
    import json
    import random
    rng = random.Random(seed)
    names = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jora", "Kemal", "Lena"]
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Tartu", "Lima", "Kyoto", "Accra"]
    subjects = ["chemistry", "geology", "music", "law", "botany", "medicine", "physics", "history"]
    jobs = ["pilot", "baker", "judge", "nurse", "sculptor", "chemist", "teacher", "ranger"]
    articles = []
    for i in range(n_people):
        name = names[i % len(names)]
        born, studied = rng.sample(cities, 2)
        year, subject, job = str(rng.randint(1850, 1990)), rng.choice(subjects), rng.choice(jobs)
        context = (f"{name} was born in {born} in {year}. After school, {name} studied {subject} at the "
                   f"university of {studied} and then worked as a {job} for many years before retiring.")
        qas = []
        for k, (question, answer) in enumerate([(f"Where was {name} born?", born), (f"When was {name} born?", year),
                                                (f"What did {name} study?", subject),
                                                (f"What did {name} work as?", job)]):
            start = context.index(answer)
            qas.append({"id": f"p{i}q{k}", "question": question, "answers": [{"text": answer, "answer_start": start}]})
        articles.append({"title": f"person_{i}", "paragraphs": [{"context": context, "qas": qas}]})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": "1.1", "data": articles}, f, indent=1)
    return path
