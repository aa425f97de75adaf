"""SQuAD v1.1: loading, feature preparation (fast tokenizer, sliding windows), post-processing and the
official v1.1 exact-match / F1.

Columns of the loaded datasets (as the hub's ``rajpurkar/squad``): ``id``, ``title``, ``context``,
``question``, ``answers`` = ``{"text": [str...], "answer_start": [int...]}``.

``datasets`` and ``transformers`` are imported lazily.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from .glue import _REPO_ROOT, PathLike, _subset_indices, hub_offline

SQUAD_TASKS = ("squad",)  # the --task names of SQuAD v1.1
SQUAD_DIR_ENV = "CAPSPARSE_SQUAD_DIR"
HUB_DATASET = "rajpurkar/squad"
SQUAD_FILES = {"train": "train-v1.1.json", "validation": "dev-v1.1.json"}
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation", "eval": "validation"}


def is_squad_task(task) -> bool:
    """True for ``"squad"`` (SQuAD v1.1 extractive question answering), a name or an object with ``.name``."""
    name = getattr(task, "name", task)
    return isinstance(name, str) and name.strip().lower() in SQUAD_TASKS


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _squad_features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": {
                "text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32")),
            },
        }
    )


def read_squad_json(path: PathLike) -> Dict[str, list]:
    """Flatten a SQuAD-format JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``)
    into columns. Raises ValueError naming the file on malformed content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    cols: Dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    try:
        for a_i, article in enumerate(obj["data"]):
            title = article.get("title", "")
            for p_i, para in enumerate(article["paragraphs"]):
                context = para["context"]
                for q_i, qa in enumerate(para["qas"]):
                    texts = [a["text"] for a in qa.get("answers", [])]
                    starts = [int(a["answer_start"]) for a in qa.get("answers", [])]
                    for t, s in zip(texts, starts):
                        if not (0 <= s <= len(context) - len(t)):
                            raise ValueError(
                                f"{path}: answer_start {s} of question {qa.get('id')!r} is outside its context"
                            )
                    cols["id"].append(str(qa["id"]))
                    cols["title"].append(title)
                    cols["context"].append(context)
                    cols["question"].append(qa["question"])
                    cols["answers"].append({"text": texts, "answer_start": starts})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not in SQuAD format (missing/invalid field {e})") from None
    return cols


def load_squad_json(path: PathLike, max_examples: Optional[int] = None, seed: int = 0):
    """A local SQuAD-format JSON as a ``datasets.Dataset`` (columns as the hub's ``rajpurkar/squad``)."""
    import datasets

    cols = read_squad_json(path)
    sel = _subset_indices(len(cols["id"]), max_examples, seed)
    if sel is not None:
        cols = {k: [v[i] for i in sel] for k, v in cols.items()}
    return datasets.Dataset.from_dict(cols, features=_squad_features())


def squad_candidates(split: str = "validation", squad_dir: Optional[PathLike] = None) -> List[Path]:
    """The files :func:`resolve_squad_file` looks at, in order: ``squad_dir`` > ``$CAPSPARSE_SQUAD_DIR`` >
    ``../shared/squad`` (from CWD, then the repo root), each joined with ``train-v1.1.json`` / ``dev-v1.1.json``."""
    split = _SPLIT_ALIASES.get(split, split)
    fname = SQUAD_FILES[split]
    dirs: List[Path] = []
    if squad_dir is not None and str(squad_dir) != "":
        dirs.append(Path(os.path.expanduser(str(squad_dir))))
    elif os.environ.get(SQUAD_DIR_ENV, "").strip():
        dirs.append(Path(os.path.expanduser(os.environ[SQUAD_DIR_ENV].strip())))
    else:
        for base in (Path.cwd(), _REPO_ROOT):
            d = (base / ".." / "shared" / "squad").resolve()
            if d not in dirs:
                dirs.append(d)
    return [d / fname for d in dirs]


def resolve_squad_file(split: str = "validation", squad_dir: Optional[PathLike] = None) -> Optional[Path]:
    """``squad_dir`` > ``$CAPSPARSE_SQUAD_DIR`` > ``../shared/squad`` (from CWD, then the repo root), holding
    ``train-v1.1.json`` / ``dev-v1.1.json``. Returns the file path if it exists, else None."""
    for f in squad_candidates(split, squad_dir):
        if f.is_file():
            return f
    return None


def missing_squad_error(split: str, squad_dir: Optional[PathLike] = None) -> FileNotFoundError:
    """The error for a SQuAD split found neither locally nor on the hub: names every path looked at and how to
    provide the data."""
    split = _SPLIT_ALIASES.get(split, split)
    looked = [str(p) for p in squad_candidates(split, squad_dir)]
    if squad_dir is None and not os.environ.get(SQUAD_DIR_ENV, "").strip():
        looked.insert(0, f"${SQUAD_DIR_ENV} (unset)")
    return FileNotFoundError(
        f"SQuAD v1.1 {split} ({SQUAD_FILES[split]}) not found locally (looked in: {', '.join(looked)}) and the "
        f"Hugging Face hub is not reachable (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set or no network), so "
        f"nothing was downloaded. Provide SQuAD-format JSON with --squad-dir DIR or the {SQUAD_DIR_ENV} environment "
        f"variable (DIR holds train-v1.1.json and dev-v1.1.json), or name the files with --squad-train-file / "
        f"--squad-dev-file (Python: load_squad(path=...))."
    )


def load_squad(
    split: str = "validation",
    path: Optional[PathLike] = None,
    squad_dir: Optional[PathLike] = None,
    max_examples: Optional[int] = None,
    seed: int = 0,
):
    """SQuAD v1.1 ``split`` ("train" / "validation"): from ``path`` (a SQuAD-format JSON) if given, else from
    ``resolve_squad_file``, else the hub dataset ``rajpurkar/squad`` (never downloaded while offline:
    FileNotFoundError instead)."""
    split = _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    if split not in SQUAD_FILES:
        raise ValueError(f"unknown SQuAD split {split!r}; known: {sorted(SQUAD_FILES)}")
    if path is not None:
        return load_squad_json(path, max_examples=max_examples, seed=seed)
    local = resolve_squad_file(split, squad_dir)
    if local is not None:
        return load_squad_json(local, max_examples=max_examples, seed=seed)
    if hub_offline():
        raise missing_squad_error(split, squad_dir)
    import datasets

    ds = datasets.load_dataset(HUB_DATASET, split=split)
    sel = _subset_indices(len(ds), max_examples, seed)
    if sel is not None:
        ds = ds.select(sel.tolist())
    return ds


# ---------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD feature preparation needs a fast tokenizer (offset mapping)")


def _truncate_questions(questions: Sequence[str], tokenizer, max_query_length: int) -> List[str]:
    qs = [q.lstrip() for q in questions]
    if max_query_length is None or max_query_length <= 0:
        return qs
    enc = tokenizer(qs, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offs in zip(qs, enc["offset_mapping"]):
        if len(offs) > max_query_length:
            q = q[: offs[max_query_length - 1][1]]
        out.append(q)
    return out


def _encode(examples, tokenizer, max_length, doc_stride, max_query_length):
    _check_fast(tokenizer)
    questions = _truncate_questions(list(examples["question"]), tokenizer, max_query_length)
    contexts = list(examples["context"])
    pad_right = getattr(tokenizer, "padding_side", "right") == "right"
    enc = tokenizer(
        questions if pad_right else contexts,
        contexts if pad_right else questions,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    return enc, (1 if pad_right else 0)


def prepare_train_features(examples: Mapping[str, list], tokenizer, max_length: int = 384, doc_stride: int = 128, max_query_length: int = 64) -> Dict[str, list]:
    """Batched ``map`` function: question/context windows (overlap ``doc_stride`` tokens) with
    ``start_positions``/``end_positions`` (the CLS index when the first answer is not fully inside a window).
    No padding (a collator pads)."""
    enc, ctx_id = _encode(examples, tokenizer, max_length, doc_stride, max_query_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        ids = enc["input_ids"][i]
        cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        seq_ids = enc.sequence_ids(i)
        answers = examples["answers"][sample_map[i]]
        if len(answers["answer_start"]) == 0:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = int(answers["answer_start"][0])
        end_char = start_char + len(answers["text"][0])
        ctx = [k for k, s in enumerate(seq_ids) if s == ctx_id]
        tok_start, tok_end = ctx[0], ctx[-1]
        if not (offsets[tok_start][0] <= start_char and offsets[tok_end][1] >= end_char):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        while tok_start <= ctx[-1] and offsets[tok_start][0] <= start_char:
            tok_start += 1
        starts.append(tok_start - 1)
        while tok_end >= ctx[0] and offsets[tok_end][1] >= end_char:
            tok_end -= 1
        ends.append(tok_end + 1)
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return dict(enc)


def prepare_eval_features(examples: Mapping[str, list], tokenizer, max_length: int = 384, doc_stride: int = 128, max_query_length: int = 64) -> Dict[str, list]:
    """Batched ``map`` function: windows as in training, plus ``example_id`` and ``offset_mapping`` where
    tokens outside the context are ``None``."""
    enc, ctx_id = _encode(examples, tokenizer, max_length, doc_stride, max_query_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    example_ids, offset_mapping = [], []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        example_ids.append(examples["id"][sample_map[i]])
        offset_mapping.append(
            [tuple(o) if seq_ids[k] == ctx_id else None for k, o in enumerate(enc["offset_mapping"][i])]
        )
    out = dict(enc)
    out["example_id"] = example_ids
    out["offset_mapping"] = offset_mapping
    return out


_MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def squad_train_features(examples, tokenizer, max_length: int = 384, doc_stride: int = 128,
                         max_query_length: int = 64):
    """Training features of a loaded SQuAD split (``datasets.Dataset``): the model columns,
    ``start_positions`` / ``end_positions`` and ``idx`` = the feature id ``0..n_features-1`` (CAP's banks hold one
    representation per feature, i.e. per window)."""
    feats = examples.map(prepare_train_features, batched=True, remove_columns=examples.column_names,
                         keep_in_memory=True, desc="SQuAD train features",
                         fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, doc_stride=doc_stride,
                                        max_query_length=max_query_length))
    feats = feats.add_column("idx", list(range(len(feats))))
    order = [c for c in _MODEL_COLUMNS + ("start_positions", "end_positions", "idx") if c in feats.column_names]
    return feats.select_columns(order)


def squad_eval_features(examples, tokenizer, max_length: int = 384, doc_stride: int = 128,
                        max_query_length: int = 64):
    """Evaluation features of a loaded SQuAD split: the model columns, ``example_id`` and ``offset_mapping``
    (for :func:`postprocess_predictions`)."""
    return examples.map(prepare_eval_features, batched=True, remove_columns=examples.column_names,
                        keep_in_memory=True, desc="SQuAD eval features",
                        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, doc_stride=doc_stride,
                                       max_query_length=max_query_length))


# ---------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------


def _column(data, name: str) -> list:
    return list(data[name])


def postprocess_predictions(
    examples,
    features,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> Dict[str, str]:
    """Turn per-feature start/end logits into an answer text per example id (SQuAD v1.1: always an answer).

    ``examples`` and ``features`` are datasets or dicts of columns (``features`` as made by
    ``prepare_eval_features``); logits are ``[n_features, seq_len]`` (padded is fine) or a list of 1-D arrays.
    For each example the best span over all its features among the ``n_best`` start and end candidates,
    with ``start <= end``, length ``<= max_answer_length`` tokens, both tokens inside the context, scores
    ``start_logit + end_logit``; ``""`` when no valid span exists."""
    ex_ids = _column(examples, "id")
    contexts = _column(examples, "context")
    feat_ex = _column(features, "example_id")
    feat_offsets = _column(features, "offset_mapping")
    if len(start_logits) != len(feat_ex) or len(end_logits) != len(feat_ex):
        raise ValueError(f"got {len(start_logits)}/{len(end_logits)} logit rows for {len(feat_ex)} features")
    by_example: Dict[str, List[int]] = collections.defaultdict(list)
    for i, e in enumerate(feat_ex):
        by_example[e].append(i)
    preds: Dict[str, str] = {}
    for ex_id, context in zip(ex_ids, contexts):
        best_score, best_text = -np.inf, ""
        for fi in by_example.get(ex_id, []):
            offsets = feat_offsets[fi]
            n_tok = len(offsets)
            s_log = np.asarray(start_logits[fi], dtype=np.float64).reshape(-1)[:n_tok]
            e_log = np.asarray(end_logits[fi], dtype=np.float64).reshape(-1)[:n_tok]
            s_idx = np.argsort(-s_log, kind="stable")[:n_best]
            e_idx = np.argsort(-e_log, kind="stable")[:n_best]
            for s in s_idx:
                so = offsets[s]
                if so is None or len(so) < 2:
                    continue
                for e in e_idx:
                    eo = offsets[e]
                    if eo is None or len(eo) < 2 or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_log[s] + e_log[e]
                    if score > best_score:
                        best_score, best_text = score, context[so[0] : eo[1]]
        preds[ex_id] = best_text
    return preds


# ---------------------------------------------------------------------------------------------------------
# Official SQuAD v1.1 evaluation
# ---------------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official v1.1 evaluator)."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: Sequence[str]):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def _as_pred_dict(predictions) -> Dict[str, str]:
    if isinstance(predictions, Mapping):
        return {str(k): v for k, v in predictions.items()}
    return {str(p["id"]): p["prediction_text"] for p in predictions}


def _as_ref_dict(references) -> Dict[str, List[str]]:
    if isinstance(references, Mapping):
        items = references.items()
    else:
        items = ((r["id"], r["answers"]) for r in references)
    out: Dict[str, List[str]] = {}
    for k, ans in items:
        if isinstance(ans, Mapping):
            ans = ans["text"]
        elif isinstance(ans, str):
            ans = [ans]
        else:
            ans = [a["text"] if isinstance(a, Mapping) else a for a in ans]
        out[str(k)] = list(ans)
    return out


def squad_metrics(predictions, references) -> Dict[str, float]:
    """Exact match and F1 (0-100) exactly as the official SQuAD v1.1 ``evaluate-v1.1.py``: for every reference
    question, the max over its ground truths; questions without a prediction score 0 (and still count).

    ``predictions``: ``{id: text}`` or ``[{"id", "prediction_text"}]``. ``references``: ``{id: [texts]}`` or an
    iterable of ``{"id", "answers": {"text": [...]}}`` (e.g. the examples dataset)."""
    preds = _as_pred_dict(predictions)
    refs = _as_ref_dict(references)
    f1 = exact_match = 0.0
    total = 0
    for qid, ground_truths in refs.items():
        total += 1
        if qid not in preds:
            continue
        if not ground_truths:
            continue
        prediction = preds[qid]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    if total == 0:
        return {"exact_match": 0.0, "f1": 0.0}
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}
