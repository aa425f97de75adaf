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
