"""Bad CLI inputs, as a table: each exits with status 2 and one stderr line naming the argument or file, never a
traceback, and none leaves a run directory or export behind; those whose check needs no model fail before any
model is loaded.

The models are tiny random BERTs (tests/_tiny.py) with the bundled tokenizer, so the whole table runs in seconds.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny import tiny_config  # noqa: E402
from capsparse import cli  # noqa: E402
from capsparse.app import tasks  # noqa: E402
from capsparse.data import resolve_glue_dir  # noqa: E402

GLUE = resolve_glue_dir()
HAS_SST2 = GLUE is not None and (Path(GLUE) / "SST-2" / "train.tsv").is_file()


def _save(model, path: Path, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny classifier, QA model, 3-label classifier and a compressed export, saved once for the module."""
    from capsparse.export import export_compressed
    from capsparse.models import default_model_path
    from capsparse.surgery import sparsify

    root = tmp_path_factory.mktemp("bad-inputs")
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path())
    kw = dict(vocab=tok.vocab_size, hidden=32, intermediate=64)
    torch.manual_seed(0)
    clf = _save(transformers.BertForSequenceClassification(tiny_config(**kw)), root / "clf", tok)
    qa = _save(transformers.BertForQuestionAnswering(tiny_config(**kw)), root / "qa", tok)
    three = _save(transformers.BertForSequenceClassification(tiny_config(num_labels=3, **kw)), root / "three", tok)
    model = transformers.BertForSequenceClassification.from_pretrained(clf)
    sparsify(model)
    export_compressed(model, root / "export", tokenizer=tok)
    return {"root": root, "clf": clf, "qa": qa, "three": three, "export": root / "export", "tok": tok}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def truncated_weights(b, tmp):
    d = _copy(b["clf"], tmp / "trunc")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


def swapped_weights(b, tmp):
    """A classifier whose model.safetensors belongs to a model of another size."""
    d = _copy(b["clf"], tmp / "swapped")
    other = transformers.BertForSequenceClassification(tiny_config(vocab=b["tok"].vocab_size, hidden=64,
                                                                   intermediate=128))
    other.save_pretrained(tmp / "other")
    (d / "model.safetensors").write_bytes((tmp / "other" / "model.safetensors").read_bytes())
    return d


def count_mismatch(b, tmp):
    """A compressed export whose kept values no longer match its masks (one tensor cut short)."""
    from safetensors.torch import load_file, save_file

    d = _copy(b["export"], tmp / "mismatch")
    path = next(p for p in d.iterdir() if p.suffix == ".safetensors")
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items()  # an encoder linear's kept values are stored flat
                if "encoder.layer" in k and k.endswith(".weight") and v.ndim == 1 and "LayerNorm" not in k)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(path), metadata={"format": "capsparse", "format_version": "2"})
    return d


def other_tool_dir(b, tmp):
    """A directory with a config.json that some other tool wrote."""
    d = tmp / "other-tool"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": "not a transformers model", "layers": 3}))
    return d


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def malicious_bin(b, tmp):
    """A transformers directory whose weights are a pickle that would run code when unpickled."""
    d = tmp / "evil"
    d.mkdir()
    for f in b["clf"].iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Evil()}, f)
    return d


def no_metadata_export(b, tmp):
    d = _copy(b["export"], tmp / "nometa")
    (d / "capsparse.json").write_text("{ not json")
    return d


def nonempty_dir(b, tmp):
    d = tmp / "taken"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


def empty_dir(b, tmp):
    d = tmp / "empty"
    d.mkdir(exist_ok=True)
    return d


P = "{p}"  # placeholder replaced by the case's made path
# (id, argv with P for the made path, maker or a base key, expected text in the one stderr line, model-free check)
CASES = [
    ("truncated-safetensors", ["eval", "--model", P], truncated_weights, "--model: cannot load", False),
    ("swapped-safetensors", ["eval", "--model", P], swapped_weights, "--model: cannot load", False),
    ("mask-value-count", ["eval", "--model", P], count_mismatch, "--model: cannot load", False),
    ("export-mask-value-count", ["export", "--model", P, "--output-dir", "{tmp}/o"], count_mismatch,
     "--model: cannot load", False),
    ("other-tool-dir", ["eval", "--model", P], other_tool_dir, "--model: cannot load", False),
    ("malicious-bin", ["eval", "--model", P], malicious_bin, "--model: cannot load", False),
    ("malicious-bin-predict", ["predict", "--model", P, "--text", "hi"], malicious_bin, "--model: cannot load",
     False),
    ("corrupt-capsparse-json", ["eval", "--model", P], no_metadata_export, "capsparse.json", False),
    ("two-labels-for-mnli-eval", ["eval", "--model", P, "--task", "mnli"], "clf",
     "--model: '{p}' is a classifier with 2 labels, expected 3 for --task mnli", True),
    ("two-labels-for-mnli-prune", ["prune", "--model", P, "--task", "mnli"], "clf",
     "is a classifier with 2 labels, expected 3", True),
    ("three-label-teacher", ["prune", "--model", "{clf}", "--teacher", P], "three",
     "--teacher: '{p}' is a classifier with 3 labels, expected 2", True),
    ("truncated-teacher", ["prune", "--model", "{clf}", "--teacher", P, "--max-steps", "1", "--max-train-examples",
                           "8", "--max-eval-examples", "8", "--output-dir", "{tmp}/run"], truncated_weights,
     "--teacher: cannot load", False),
    ("qa-teacher-for-glue", ["prune", "--model", "{clf}", "--teacher", P, "--max-train-examples", "8",
                             "--max-eval-examples", "8", "--output-dir", "{tmp}/run"], "qa",
     "--teacher: '{p}' is a question-answering model", False),
    ("qa-model-for-glue-eval", ["eval", "--model", P, "--max-eval-examples", "8"], "qa",
     "is a question-answering model", False),
    ("cap-option-bool", ["prune", "--cap-option", "use_cap=nope"], None, "--cap-option: got use_cap='nope', "
     "expected true or false", True),
    ("cap-option-unknown", ["prune", "--cap-option", "temprature=0.1"], None,
     "--cap-option: got unknown CAPConfig field 'temprature'", True),
    ("cap-option-type", ["prune", "--cap-option", "n_extra_keys=many"], None,
     "--cap-option: got n_extra_keys='many', expected an integer", True),
    ("cap-option-value", ["prune", "--cap-option", "temperature=-1"], None, "--cap-option: temperature", True),
    ("cap-option-vs-sparsity", ["prune", "--sparsity", "0.9", "--cap-option", "target_sparsity=0.5"], None,
     "--cap-option: got target_sparsity=0.5 with --sparsity 0.9", True),
    ("cap-option-vs-method", ["prune", "--method", "movement", "--cap-option", "method=magnitude"], None,
     "--cap-option: got method='magnitude' with --method 'movement'", True),
    ("cap-option-vs-block-size", ["prune", "--block-size", "32", "--method", "block-movement", "--cap-option",
                                  "block_size=16"], None, "--cap-option: got block_size=16 with --block-size 32", True),
    ("cap-option-vs-no-cap", ["prune", "--no-cap", "--cap-option", "use_cap=true"], None,
     "--cap-option: got use_cap=True with --cap False", True),
    ("soft-movement-sparsity", ["prune", "--method", "soft-movement", "--sparsity", "0.9"], None,
     "--sparsity: got 0.9 with --method soft-movement", True),
    ("recipe-vs-method", ["prune", "--method", "movement", "--recipe", "glue-structured"], None,
     "--recipe: got 'glue-structured' with --method movement", True),
    ("eval-test-split", ["eval", "--model", "{clf}", "--split", "test"], None,
     "--split: got 'test', expected a split with labels", True),
    ("demo-task", ["demo", "--task", "mrpc"], None, "unrecognized arguments: --task mrpc", True),
    ("predict-seed", ["predict", "--model", "{clf}", "--text", "x", "--seed", "3"], None,
     "unrecognized arguments: --seed 3", True),
    ("missing-glue-data", ["prune", "--model", "{clf}", "--glue-dir", P, "--output-dir", "{tmp}/run"], empty_dir,
     "FileNotFoundError", True),
    ("missing-teacher", ["prune", "--teacher", "{tmp}/nope/teacher"], None, "--teacher: got", True),
    ("nonempty-output-dir", ["prune", "--output-dir", P], nonempty_dir, "--output-dir: {p} is not empty", True),
    ("resume-nothing", ["prune", "--output-dir", P, "--resume"], empty_dir, "--resume: {p} holds no run", True),
    ("resume-and-overwrite", ["prune", "--output-dir", P, "--resume", "--overwrite"], empty_dir,
     "--resume/--overwrite: got both", True),
    ("overwrite-foreign-dir", ["prune", "--output-dir", P, "--overwrite"], nonempty_dir,
     "--overwrite: {p} is not a capsparse run directory", True),
    ("resume-for-eval", ["eval", "--model", "{clf}", "--save-steps", "2"], None, "unrecognized arguments", True),
    ("weight-decay", ["finetune", "--weight-decay", "-1"], None, "--weight-decay: got -1.0", True),
    ("save-steps", ["prune", "--save-steps", "0"], None, "--save-steps: got 0", True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, base, tmp_path, monkeypatch, capsys):
    name, argv, make, needle, model_free = case
    if not model_free and argv[0] in ("eval", "prune") and not HAS_SST2:
        pytest.skip("SST-2 not found in the local GLUE directory (these checks come after the data is read)")
    made = None
    if callable(make):
        made = make(base, tmp_path)
    elif make is not None:
        made = base[make]
    fill = {"p": str(made), "tmp": str(tmp_path), "clf": str(base["clf"])}
    argv = [a.format(**fill) for a in argv]
    needle = needle.format(**fill)
    if model_free:
        monkeypatch.setattr(tasks, "load_checked", lambda *a, **k: pytest.fail("a model was loaded"))
    before = set(tmp_path.iterdir())
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines()  # not argparse's usage, not progress bars
             if line.strip() and not line.startswith("usage:") and "it/s]" not in line]
    assert code == 2, (name, code, err[-2000:])
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    assert set(tmp_path.iterdir()) == before  # refused before any run directory or export was written


def test_no_silent_override_in_config_json(base, tmp_path):
    """What config.json records is what runs: a --cap-option that repeats a flag is folded into it."""
    from capsparse.app.options import build_cap_config, resolve

    o = resolve({"cap_option": ["target_sparsity=0.5", "use_cap=false", "temperature=0.2"]}, "prune")
    assert (o["sparsity"], o["cap"], o["cap_options"]) == (0.5, False, {"temperature": 0.2})
    cfg = build_cap_config(o)
    assert (cfg.target_sparsity, cfg.use_cap, cfg.temperature) == (0.5, False, 0.2)
    assert resolve(o, "prune") == o  # idempotent
    soft = resolve({"method": "soft-movement"}, "prune")
    assert soft["sparsity"] is None and build_cap_config(soft).method == "soft-movement"
    # the Python API and the CLI resolve the same defaults
    a = cli.parse_args(["prune", "--method", "first-order"])
    assert {k: getattr(a, k) for k in ("recipe", "learning_rate", "batch_size", "weight_decay")} == {
        k: resolve({"method": "first-order"}, "prune")[k] for k in ("recipe", "learning_rate", "batch_size",
                                                                     "weight_decay")}


def test_official_flag_restores_the_official_code_and_still_yields_to_cap_options():
    from capsparse.app.options import OptionError, build_cap_config, resolve

    ours = build_cap_config(resolve({}, "prune"))
    assert (ours.score_init_mode, ours.representation) == ("magnitude", "cls")
    official = build_cap_config(resolve(vars(cli.parse_args(["prune", "--official"])), "prune"))
    assert (official.score_init_mode, official.score_init, official.representation) == ("constant", 0.0, "pooler")
    # everything else is the recipe's
    assert {k: v for k, v in official.to_dict().items() if k not in ("score_init_mode", "representation")} == \
        {k: v for k, v in ours.to_dict().items() if k not in ("score_init_mode", "representation")}
    mixed = build_cap_config(resolve({"official": True, "cap_option": ["representation=cls"]}, "prune"))
    assert (mixed.score_init_mode, mixed.representation) == ("constant", "cls")
    squad = build_cap_config(resolve({"official": True, "task": "squad"}, "prune"))
    assert (squad.score_init_mode, squad.representation) == ("constant", "cls")  # official SQuAD query: [CLS]
    with pytest.raises(OptionError, match=r"--official: got 'yes', expected true or false"):
        resolve({"official": "yes"}, "prune")


def test_help_has_no_none_defaults():
    parser = cli.build_parser()
    for command in ("finetune", "prune", "eval", "export", "demo", "predict"):
        text = cli._subparser(parser, command).format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, command
        flat = " ".join(text.split())
        assert not re.search(r"\(default: [^)]*\) \(default:", flat), command
    prune = cli._subparser(parser, "prune").format_help()
    assert "--no-cap" in prune and "(default: True)" not in prune
    demo = cli._subparser(parser, "demo")
    assert "--task" not in [opt for action in demo._actions for opt in action.option_strings]
