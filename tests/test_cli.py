"""CLI: parsing, --config (YAML/JSON) with overrides, validation errors and exit codes, bench dispatch."""
import json
import subprocess
import sys

import pytest

from capsparse import cli


def parse(argv):
    return cli.parse_args(argv)


def run_main(argv, capsys):
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_help_mentions_every_flag(capsys):
    parser = cli.build_parser()
    for command in ("finetune", "prune", "eval", "export", "bench", "demo", "predict"):
        sub = cli._subparser(parser, command)
        text = sub.format_help()
        for action in sub._actions:
            if action.help == "==SUPPRESS==":
                continue
            assert action.help, f"{command} {action.dest} has no help"
            for opt in action.option_strings:
                assert opt in text


def test_prune_defaults_and_flags():
    a = parse(["prune", "--method", "movement", "--no-cap", "--sparsity", "0.97", "--max-steps", "10", "--seed", "3"])
    assert a.method == "movement" and a.cap is False and a.sparsity == 0.97 and a.max_steps == 10 and a.seed == 3
    a = parse(["prune", "--cap", "--method", "block-movement", "--block-size", "32"])
    assert a.cap is True and a.block_size == 32
    a = parse(["prune"])  # the recipe fills what was not given, and the namespace records it
    assert (a.cap, a.recipe, a.task, a.method, a.sparsity) == (True, "glue-unstructured", "sst2", "movement", 0.9)
    assert (a.learning_rate, a.batch_size, a.weight_decay, a.warmup_ratio) == (3e-5, 32, 0.0, 0.1)
    a = parse(["prune", "--method", "first-order"])  # the structured recipe's training values apply
    assert (a.recipe, a.learning_rate, a.batch_size, a.weight_decay, a.warmup_ratio) == (
        "glue-structured", 2e-5, 16, 0.01, None)
    a = parse(["prune", "--cap-option", "temperature=0.2", "--cap-option", "banks=[\"prc\"]"])
    assert a.cap_options == {"temperature": 0.2, "banks": ["prc"]}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_with_cli_override(tmp_path, suffix):
    values = {"method": "magnitude", "sparsity": 0.8, "max-steps": 7, "batch_size": 8, "no_cap": True,
              "cap_option": {"w_u": 0.5}}
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    a = parse(["prune", "--config", str(path)])
    assert (a.method, a.sparsity, a.max_steps, a.batch_size, a.cap) == ("magnitude", 0.8, 7, 8, False)
    assert a.cap_options == {"w_u": 0.5}
    a = parse(["prune", "--config", str(path), "--sparsity", "0.5", "--cap", "--batch-size", "4"])
    assert (a.sparsity, a.cap, a.batch_size, a.max_steps) == (0.5, True, 4, 7)


@pytest.mark.parametrize("argv, needle", [
    (["prune", "--sparsity", "1.2"], "--sparsity: got 1.2"),
    (["prune", "--sparsity", "-0.1"], "--sparsity"),
    (["prune", "--block-size", "24", "--method", "block-movement"], "--block-size: got 24"),
    (["prune", "--block-size", "32", "--method", "movement"], "--block-size"),
    (["prune", "--max-steps", "0"], "--max-steps: got 0"),
    (["prune", "--batch-size", "0"], "--batch-size"),
    (["prune", "--epochs", "-1"], "--epochs"),
    (["prune", "--learning-rate", "2"], "--learning-rate"),
    (["prune", "--task", "nope"], "--task: got 'nope'"),
    (["prune", "--glue-dir", "/definitely/not/here"], "--glue-dir"),
    (["prune", "--teacher", "/definitely/not/here"], "--teacher"),
    (["prune", "--cap-option", "novalue"], "--cap-option"),
    (["eval"], "--model"),
    (["eval", "--model", "default", "--split", "bogus"], "--split"),
    (["predict", "--model", "default"], "--text/--input"),
    (["prune", "--config", "/no/such/file.yaml"], "--config: file"),
    (["bench", "no_such_suite"], "bench: got suite 'no_such_suite'"),
])
def test_domain_errors_exit_2_one_line(argv, needle, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err
    assert needle in lines[0]


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: [1, 2\n")
    code, _, err = run_main(["prune", "--config", str(bad)], capsys)
    assert code == 2 and "--config: cannot parse" in err
    unk = tmp_path / "unk.json"
    unk.write_text(json.dumps({"sparsty": 0.9}))
    code, _, err = run_main(["prune", "--config", str(unk)], capsys)
    assert code == 2 and "unknown option 'sparsty'" in err
    badval = tmp_path / "v.json"
    badval.write_text(json.dumps({"sparsity": 3}))
    code, _, err = run_main(["prune", "--config", str(badval)], capsys)
    assert code == 2 and "--sparsity: got 3" in err
    lst = tmp_path / "l.json"
    lst.write_text("[1, 2]")
    code, _, err = run_main(["prune", "--config", str(lst)], capsys)
    assert code == 2 and "expected a mapping" in err
    choice = tmp_path / "m.json"
    choice.write_text(json.dumps({"method": "random"}))
    code, _, err = run_main(["prune", "--config", str(choice)], capsys)
    assert code == 2 and "'method'" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", "--method", "random"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", "--sparsity", "abc"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_bench_dispatch(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_toy.py").write_text("def main(argv=None):\n    print('toy', argv)\n    return 0\n")
    (tmp_path / "bench_nomain.py").write_text("x = 1\n")
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path)
    code, out, _ = run_main(["bench"], capsys)
    assert code == 0 and "nomain" in out and "toy" in out
    code, out, _ = run_main(["bench", "toy", "--quick", "--reps", "2"], capsys)
    assert code == 0 and "toy ['--quick', '--reps', '2']" in out
    code, _, err = run_main(["bench", "nomain"], capsys)
    assert code == 2 and "no main(argv)" in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "capsparse", "prune", "--sparsity", "2"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["capsparse: error: --sparsity: got 2.0, expected a fraction in [0, 1), "
                                                "e.g. 0.9 for 90%"]
    proc = subprocess.run([sys.executable, "-m", "capsparse", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "prune" in proc.stdout and "demo" in proc.stdout


@pytest.mark.parametrize("argv", [["eval", "--model", "m", "--task", "sst2"], ["demo", "--quick"],
                                  ["export", "--model", "m", "--output-dir", "o"], ["bench", "kernels"]])
def test_single_process_commands_refuse_torchrun(argv, monkeypatch, capsys):
    """Commands that do not train refuse a multi-process launch before doing anything (no racing file writes)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert f"`capsparse {argv[0]}` runs in one process" in err and "WORLD_SIZE=2" in err


def test_rundir_writes_only_on_rank_zero(tmp_path, monkeypatch):
    from capsparse.runlog import RunDir

    monkeypatch.setenv("RANK", "1")
    other = RunDir(tmp_path / "r1", command="prune")
    other.write_config({"a": 1})
    assert other.update_metrics(x=1) == {"x": 1}  # kept in memory
    assert list((tmp_path / "r1").iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    main = RunDir(tmp_path / "r0", command="prune")
    main.write_config({"a": 1})
    main.update_metrics(x=1)
    assert {p.name for p in (tmp_path / "r0").iterdir()} >= {"config.json", "metrics.json", "run.log"}


def test_predict_output_dir_writes_the_predictions(tmp_path, capsys):
    """`predict --output-dir` takes effect: predictions.jsonl holds what was printed, config.json the options."""
    transformers = pytest.importorskip("transformers")
    import torch
    from _tiny import tiny_config

    from capsparse.models import default_model_path

    tok = transformers.AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    transformers.BertForSequenceClassification(tiny_config(vocab=tok.vocab_size)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "pred"
    code, printed, _ = run_main(["predict", "--model", str(model_dir), "--text", "a fine film", "--text", "dull",
                                 "--task", "sst2", "--json", "--output-dir", str(out)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) for line in printed.strip().splitlines()] and len(rows) == 2
    assert {r["label"] for r in rows} <= {"negative", "positive"}
    assert json.loads((out / "config.json").read_text())["options"]["text"] == ["a fine film", "dull"]
