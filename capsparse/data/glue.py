"""GLUE tasks: registry, local TSV readers (with the GLUE files' quirks), hub fallback and tokenisation.

Local layout (the standard ``download_glue_data.py`` layout)::

    <glue_dir>/SST-2/{train,dev,test}.tsv        <glue_dir>/MRPC/{train,dev,test}.tsv
    <glue_dir>/RTE/{train,dev,test}.tsv          <glue_dir>/CoLA/{train,dev,test}.tsv
    <glue_dir>/STS-B/{train,dev,test}.tsv        <glue_dir>/QNLI/{train,dev,test}.tsv
    <glue_dir>/MNLI/{train,dev_matched,dev_mismatched,test_matched,test_mismatched}.tsv
    <glue_dir>/QQP/{train,dev,test}.tsv

Quirks handled by the readers:

* every file is read with quoting off (tab split, the equivalent of ``csv.QUOTE_NONE``), as GLUE's own
  readers do: QNLI/MRPC sentences that begin with a bare ``"`` are kept verbatim;
* a UTF-8 BOM at the start of a file (MRPC train/dev) is dropped;
* CoLA ``train.tsv``/``dev.tsv`` have no header (4 columns: source, label, original mark, sentence);
* leading/trailing whitespace of text fields is stripped (SST-2 sentences carry a trailing space);
* lines are split on ``\\n`` only (a trailing ``\\r`` is dropped); a missing final newline is fine;
* test splits have no labels: ``label`` is ``-1`` (``-1.0`` for STS-B).

This module imports ``datasets`` lazily (inside functions), so ``import capsparse.data`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

GLUE_DIR_ENV = "CAPSPARSE_GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"
_CACHE_FORMAT_VERSION = "1"

# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    ``text_fields`` are the column names of the returned dataset (the names of the hub's ``nyu-mll/glue``).
    ``tsv_columns`` maps each text field to its header name in the local TSV; ``label_column`` is the header
    name of the label. ``headerless`` (CoLA) gives ``(n_columns, {field: position}, label_position)`` for the
    headerless train/dev files. ``splits`` maps canonical split names to ``(tsv file name, hub split name)``.
    """

    name: str
    dir_name: str
    hub_config: str
    text_fields: Tuple[str, ...]
    num_labels: int
    label_names: Optional[Tuple[str, ...]]
    metrics: Tuple[str, ...]
    main_metric: str
    tsv_columns: Mapping[str, str]
    label_column: str
    splits: Mapping[str, Tuple[str, str]]
    split_aliases: Mapping[str, str] = field(default_factory=dict)
    headerless: Optional[Tuple[int, Mapping[str, int], int]] = None
    headerless_splits: Tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def label2id(self) -> Dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names or ())}

    @property
    def id2label(self) -> Dict[int, str]:
        return {i: n for i, n in enumerate(self.label_names or ())}

    def resolve_split(self, split: str) -> str:
        s = str(split).strip().lower().replace("-", "_")
        s = self.split_aliases.get(s, s)
        if s not in self.splits:
            raise ValueError(
                f"unknown split {split!r} for GLUE task {self.name!r}; known splits: "
                f"{sorted(self.splits)} (aliases: {sorted(self.split_aliases)})"
            )
        return s


_STD_SPLITS = {"train": ("train.tsv", "train"), "validation": ("dev.tsv", "validation"), "test": ("test.tsv", "test")}
_STD_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation", "eval": "validation"}


def _mnli_task(name: str, matched: bool) -> GlueTask:
    dev = "validation_matched" if matched else "validation_mismatched"
    test = "test_matched" if matched else "test_mismatched"
    return GlueTask(
        name=name,
        dir_name="MNLI",
        hub_config="mnli",
        text_fields=("premise", "hypothesis"),
        num_labels=3,
        label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        main_metric="accuracy",
        tsv_columns={"premise": "sentence1", "hypothesis": "sentence2"},
        label_column="gold_label",
        splits={
            "train": ("train.tsv", "train"),
            "validation_matched": ("dev_matched.tsv", "validation_matched"),
            "validation_mismatched": ("dev_mismatched.tsv", "validation_mismatched"),
            "test_matched": ("test_matched.tsv", "test_matched"),
            "test_mismatched": ("test_mismatched.tsv", "test_mismatched"),
        },
        split_aliases={
            **{k: dev for k in ("dev", "val", "valid", "eval", "validation")},
            "test": test,
            "dev_matched": "validation_matched",
            "dev_mismatched": "validation_mismatched",
            "validation_m": "validation_matched",
            "validation_mm": "validation_mismatched",
            "dev_m": "validation_matched",
            "dev_mm": "validation_mismatched",
        },
    )


GLUE_TASKS: Dict[str, GlueTask] = {
    "sst2": GlueTask(
        name="sst2", dir_name="SST-2", hub_config="sst2", text_fields=("sentence",), num_labels=2,
        label_names=("negative", "positive"), metrics=("accuracy",), main_metric="accuracy",
        tsv_columns={"sentence": "sentence"}, label_column="label", splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
    ),
    "mrpc": GlueTask(
        name="mrpc", dir_name="MRPC", hub_config="mrpc", text_fields=("sentence1", "sentence2"), num_labels=2,
        label_names=("not_equivalent", "equivalent"), metrics=("accuracy", "f1"), main_metric="combined_score",
        tsv_columns={"sentence1": "#1 String", "sentence2": "#2 String"}, label_column="Quality",
        splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
    ),
    "rte": GlueTask(
        name="rte", dir_name="RTE", hub_config="rte", text_fields=("sentence1", "sentence2"), num_labels=2,
        label_names=("entailment", "not_entailment"), metrics=("accuracy",), main_metric="accuracy",
        tsv_columns={"sentence1": "sentence1", "sentence2": "sentence2"}, label_column="label",
        splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
    ),
    "cola": GlueTask(
        name="cola", dir_name="CoLA", hub_config="cola", text_fields=("sentence",), num_labels=2,
        label_names=("unacceptable", "acceptable"), metrics=("matthews_correlation",),
        main_metric="matthews_correlation", tsv_columns={"sentence": "sentence"}, label_column="label",
        splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
        headerless=(4, {"sentence": 3}, 1), headerless_splits=("train", "validation"),
    ),
    "stsb": GlueTask(
        name="stsb", dir_name="STS-B", hub_config="stsb", text_fields=("sentence1", "sentence2"), num_labels=1,
        label_names=None, metrics=("pearson", "spearmanr"), main_metric="combined_score",
        tsv_columns={"sentence1": "sentence1", "sentence2": "sentence2"}, label_column="score",
        splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
    ),
    "qnli": GlueTask(
        name="qnli", dir_name="QNLI", hub_config="qnli", text_fields=("question", "sentence"), num_labels=2,
        label_names=("entailment", "not_entailment"), metrics=("accuracy",), main_metric="accuracy",
        tsv_columns={"question": "question", "sentence": "sentence"}, label_column="label",
        splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
    ),
    "mnli": _mnli_task("mnli", matched=True),
    "mnli-mm": _mnli_task("mnli-mm", matched=False),
    "qqp": GlueTask(
        name="qqp", dir_name="QQP", hub_config="qqp", text_fields=("question1", "question2"), num_labels=2,
        label_names=("not_duplicate", "duplicate"), metrics=("accuracy", "f1"), main_metric="combined_score",
        tsv_columns={"question1": "question1", "question2": "question2"}, label_column="is_duplicate",
        splits=_STD_SPLITS, split_aliases=_STD_ALIASES,
    ),
}

_TASK_ALIASES: Dict[str, str] = {
    "sst": "sst2", "sst_2": "sst2",
    "sts": "stsb", "sts_b": "stsb",
    "mnli_m": "mnli", "mnli_matched": "mnli", "multinli": "mnli",
    "mnli_mm": "mnli-mm", "mnli_mismatched": "mnli-mm", "mnlimm": "mnli-mm",
}


def _norm_task_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def get_glue_task(task: Union[str, GlueTask]) -> GlueTask:
    """Look a task up by name, case-insensitively, with aliases (``SST-2``, ``sst2``, ``STS-B``, ``mnli-mm``...)."""
    if isinstance(task, GlueTask):
        return task
    key = _norm_task_key(task)
    for name in GLUE_TASKS:
        if key == _norm_task_key(name) or key.replace("_", "") == _norm_task_key(name).replace("_", ""):
            return GLUE_TASKS[name]
    if key in _TASK_ALIASES:
        return GLUE_TASKS[_TASK_ALIASES[key]]
    if key.replace("_", "") in _TASK_ALIASES:
        return GLUE_TASKS[_TASK_ALIASES[key.replace("_", "")]]
    raise ValueError(f"unknown GLUE task {task!r}; known tasks: {', '.join(GLUE_TASKS)}")


def glue_task_names() -> List[str]:
    return list(GLUE_TASKS)


# ---------------------------------------------------------------------------------------------------------
# Locating the data
# ---------------------------------------------------------------------------------------------------------

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _glue_dir_candidates() -> List[Path]:
    out: List[Path] = []
    for base in (Path.cwd(), _REPO_ROOT):
        p = (base / ".." / "shared" / "glue").resolve()
        if p not in out:
            out.append(p)
    return out


def resolve_glue_dir(glue_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where the local GLUE copy is: ``glue_dir`` (flag) > ``$CAPSPARSE_GLUE_DIR`` > ``../shared/glue`` relative
    to the current directory, then relative to the repository root (the first that exists) > ``None``.

    An explicit flag or env var is returned as given (expanded), even if it does not exist, so that errors name it.
    """
    if glue_dir is not None and str(glue_dir) != "":
        return Path(os.path.expanduser(str(glue_dir)))
    env = os.environ.get(GLUE_DIR_ENV, "").strip()
    if env:
        return Path(os.path.expanduser(env))
    for cand in _glue_dir_candidates():
        if cand.is_dir():
            return cand
    return None


def _env_flag(name: str) -> bool:
    v = os.environ.get(name)
    if v is None:
        return False
    return v.strip().lower() not in ("", "0", "false", "no", "off")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE is set, or the hub is unreachable."""
    if any(_env_flag(n) for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=2.0):
            return False
    except OSError:
        return True


def _missing_data_error(what: str, looked: Sequence[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found locally (looked in: {', '.join(looked)}) and the Hugging Face hub is not reachable "
        f"(offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set or no network), so nothing was downloaded. "
        f"Provide the GLUE data with --glue-dir DIR or the {GLUE_DIR_ENV} environment variable "
        f"(DIR holds the standard layout, e.g. DIR/SST-2/train.tsv)."
    )


# ---------------------------------------------------------------------------------------------------------
# TSV reading
# ---------------------------------------------------------------------------------------------------------


def _iter_tsv_rows(path: Path):
    """Yield ``(line_number, fields)``; quoting off, BOM dropped, split on \\n only, empty lines skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e})") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            if line == "":
                continue
            yield lineno, line.split("\t")


def _parse_label(task: GlueTask, value: str, path: Path, lineno: int) -> Union[int, float]:
    v = value.strip()
    if task.is_regression:
        try:
            x = float(v)
        except ValueError:
            x = float("nan")
        if not math.isfinite(x):
            raise ValueError(f"{path}:{lineno}: bad label {value!r} for {task.name} (expected a finite float score)")
        return x
    names = task.label2id
    if v in names:
        return names[v]
    try:
        i = int(v)
    except ValueError:
        i = -2
    if 0 <= i < task.num_labels:
        return i
    raise ValueError(
        f"{path}:{lineno}: bad label {value!r} for {task.name} "
        f"(expected one of {list(task.label_names or ())} or an integer in 0..{task.num_labels - 1})"
    )


def read_glue_tsv(path: PathLike, task: Union[str, GlueTask], split: str) -> Dict[str, list]:
    """Read one local GLUE TSV into columns ``{*text_fields, 'label'}`` (file order). Raises ValueError on
    malformed rows (wrong column count, bad label, missing header column) naming the file and line."""
    t = get_glue_task(task)
    split = t.resolve_split(split)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {path}")
    cols: Dict[str, list] = {f: [] for f in t.text_fields}
    labels: list = []
    rows = _iter_tsv_rows(path)
    if t.headerless is not None and split in t.headerless_splits:
        ncols, positions, label_pos = t.headerless
        has_label = True
    else:
        try:
            hline, header = next(rows)
        except StopIteration:
            raise ValueError(f"{path}: empty file (expected a header line)") from None
        header = [h.strip() for h in header]
        ncols = len(header)
        positions = {}
        for fname, hname in t.tsv_columns.items():
            if hname not in header:
                raise ValueError(
                    f"{path}:{hline}: header has no column {hname!r} for {t.name} field {fname!r}; header: {header}"
                )
            positions[fname] = header.index(hname)
        has_label = t.label_column in header
        label_pos = header.index(t.label_column) if has_label else -1
    missing = -1.0 if t.is_regression else -1
    for lineno, fields in rows:
        if len(fields) != ncols:
            raise ValueError(
                f"{path}:{lineno}: expected {ncols} tab-separated columns for {t.name}/{split}, got {len(fields)}"
            )
        for fname, pos in positions.items():
            cols[fname].append(fields[pos].strip())
        labels.append(_parse_label(t, fields[label_pos], path, lineno) if has_label else missing)
    cols["label"] = labels
    return cols


def _features(t: GlueTask):
    import datasets

    feats = {f: datasets.Value("string") for f in t.text_fields}
    feats["label"] = datasets.Value("float32" if t.is_regression else "int64")
    feats["idx"] = datasets.Value("int64")
    return datasets.Features(feats)


def _subset_indices(n: int, max_examples: Optional[int], seed: int):
    import numpy as np

    if max_examples is None or max_examples >= n:
        return None
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_examples), replace=False))


def load_glue(
    task: Union[str, GlueTask],
    split: str,
    glue_dir: Optional[PathLike] = None,
    max_examples: Optional[int] = None,
    seed: int = 0,
):
    """Load one GLUE split as a ``datasets.Dataset`` with the task's text columns, ``label`` and ``idx``.

    ``label`` is an int (class index in ``GlueTask.label_names`` order) or a float for STS-B; test splits
    without labels give ``-1``. ``idx`` is the position of the example in the *returned* dataset, 0..n-1 in
    file order: with ``max_examples`` a seeded random subset (``seed``) is taken, kept in file order, and
    ``idx`` is renumbered 0..n-1 (contiguous, as CAP's memory banks need).

    Data comes from ``resolve_glue_dir(glue_dir)``; when no local file is there the hub dataset
    ``nyu-mll/glue`` is used, unless offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE or no network), in which
    case FileNotFoundError names the paths looked in. No download is ever attempted while offline.
    """
    import datasets

    t = get_glue_task(task)
    split = t.resolve_split(split)
    fname, hub_split = t.splits[split]
    root = resolve_glue_dir(glue_dir)
    looked: List[str] = []
    if root is not None:
        path = root / t.dir_name / fname
        looked.append(str(path))
        if path.is_file():
            cols = read_glue_tsv(path, t, split)
            n = len(cols["label"])
            sel = _subset_indices(n, max_examples, seed)
            if sel is not None:
                cols = {k: [v[i] for i in sel] for k, v in cols.items()}
                n = len(sel)
            cols["idx"] = list(range(n))
            ds = datasets.Dataset.from_dict(cols, features=_features(t), split=split)
            return ds
    else:
        looked.append(f"${GLUE_DIR_ENV} (unset)")
        looked.extend(str(p) for p in _glue_dir_candidates())
    if hub_offline():
        raise _missing_data_error(f"GLUE {t.name}/{split} ({t.dir_name}/{fname})", looked)
    logger.warning("GLUE %s/%s not found locally (%s); loading %s from the hub", t.name, split, looked, HUB_DATASET)
    ds = datasets.load_dataset(HUB_DATASET, t.hub_config, split=hub_split)
    keep = [c for c in ds.column_names if c in t.text_fields or c == "label"]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    sel = _subset_indices(len(ds), max_examples, seed)
    if sel is not None:
        ds = ds.select(sel.tolist())
    ds = ds.add_column("idx", list(range(len(ds))))
    ds = ds.cast(_features(t))
    return ds


# ---------------------------------------------------------------------------------------------------------
# Tokenisation (no padding: a collator pads dynamically)
# ---------------------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars"):
        h.update(f"{k}={init.get(k)!r}".encode())
    return h.hexdigest()


def _dataset_fingerprint(dataset, text_fields: Sequence[str]) -> str:
    h = hashlib.sha256()
    cols = [c for c in list(text_fields) + ["label", "idx"] if c in dataset.column_names]
    data = dataset.select_columns(cols).with_format(None)[:] if len(dataset) else {c: [] for c in cols}
    for c in cols:
        h.update(c.encode() + b"\x00")
        h.update(json.dumps(list(data[c]), ensure_ascii=False).encode())
    return h.hexdigest()


def tokenization_cache_path(dataset, tokenizer, task: Union[str, GlueTask], max_length: int, cache_dir: PathLike) -> Path:
    """The cache file ``tokenize_dataset`` uses: keyed by task, split, tokenizer (name/path + vocab hash),
    max_length, number of examples and a hash of the dataset's contents."""
    t = get_glue_task(task)
    split = str(getattr(dataset, "split", None) or "unknown")
    key = hashlib.sha256(
        "|".join(
            [
                _CACHE_FORMAT_VERSION,
                t.name,
                split,
                str(getattr(tokenizer, "name_or_path", "")),
                _tokenizer_fingerprint(tokenizer),
                str(int(max_length)),
                str(len(dataset)),
                _dataset_fingerprint(dataset, t.text_fields),
            ]
        ).encode()
    ).hexdigest()[:20]
    safe_split = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in split)
    name = f"glue-{t.name}-{safe_split}-len{int(max_length)}-n{len(dataset)}-{key}.arrow"
    return Path(cache_dir) / name


def tokenize_dataset(dataset, tokenizer, task: Union[str, GlueTask], max_length: int = 128, cache_dir: Optional[PathLike] = None):
    """Tokenise a dataset from ``load_glue`` (truncation to ``max_length``, no padding).

    Returns a dataset with ``input_ids``, ``attention_mask``, ``token_type_ids`` (zeros when the tokenizer has
    none), ``labels`` and ``idx``. With ``cache_dir`` the result is stored in (and reloaded from) the Arrow file
    ``tokenization_cache_path(...)`` through ``datasets.Dataset.map``.
    """
    t = get_glue_task(task)
    missing = [f for f in t.text_fields if f not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing} for GLUE task {t.name}; columns: {dataset.column_names}")
    fields = list(t.text_fields)

    def _tok(batch: Dict[str, list]) -> Dict[str, list]:
        texts = [batch[f] for f in fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=False)
        out = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
        }
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        else:
            out["token_type_ids"] = [[0] * len(ids) for ids in enc["input_ids"]]
        if "label" in batch:
            out["labels"] = batch["label"]
        return out

    remove = [c for c in dataset.column_names if c != "idx"]
    kwargs: Dict[str, Any] = dict(batched=True, remove_columns=remove, desc=f"tokenize {t.name}")
    if cache_dir is not None:
        path = tokenization_cache_path(dataset, tokenizer, t, max_length, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(cache_file_name=str(path), load_from_cache_file=True, new_fingerprint=path.stem[-20:])
    else:
        kwargs.update(keep_in_memory=True)
    out = dataset.map(_tok, **kwargs)
    order = ["input_ids", "attention_mask", "token_type_ids", "labels", "idx"]
    return out.select_columns([c for c in order if c in out.column_names])
