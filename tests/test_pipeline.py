"""End-to-end: a tiny random BERT (default tokenizer) through `capsparse finetune / prune / eval / predict / export`.

A few hundred SST-2 examples, a few steps: checks the plumbing and the run directory, not accuracy.
"""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from capsparse import cli  # noqa: E402
from capsparse.data import resolve_glue_dir  # noqa: E402

GLUE = resolve_glue_dir()
needs_glue = pytest.mark.skipif(GLUE is None or not (Path(GLUE) / "SST-2" / "train.tsv").is_file(),
                                reason="SST-2 not found in the local GLUE directory")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from capsparse.models import default_model_path

    path = tmp_path_factory.mktemp("tiny")
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path())
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                                     num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_script(name: str):
    """Import ``scripts/<name>.py`` (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_flags(flags):
    """``flags`` without ``--batch-size N``: eval trains nothing, so the CLI refuses a training batch size."""
    i = flags.index("--batch-size")
    return flags[:i] + flags[i + 2:]


COMMON = ["--task", "sst2", "--max-length", "32", "--batch-size", "16", "--eval-batch-size", "64",
          "--max-train-examples", "96", "--max-eval-examples", "64", "--seed", "1"]


@needs_glue
def test_finetune_prune_eval_predict_export(tiny_model_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--max-steps", "3", "--output-dir", str(teacher_dir),
                     *COMMON]) == 0
    for f in ("config.json", "metrics.json", "run.log", "losses.png", "model/config.json"):
        assert (teacher_dir / f).is_file(), f

    cfg = tmp_path / "prune.yaml"
    cfg.write_text("method: movement\nsparsity: 0.5\nmax_steps: 8\ncap_option:\n  n_extra_keys: 16\n")
    run = tmp_path / "capm"
    code = cli.main(["prune", "--config", str(cfg), "--model", str(tiny_model_dir), "--teacher",
                     str(teacher_dir / "model"), "--cap", "--output-dir", str(run), "--logging-steps", "2", *COMMON])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["sparsity"] == 0.5 and config["cap_config"]["use_cap"] is True
    assert metrics["method"] == "CAP-m" and metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0.0 <= metrics["eval"]["accuracy"] <= 1.0 and metrics["eval"]["num_examples"] == 64
    assert (run / "sparsity.png").is_file() and (run / "losses.png").is_file() and (run / "run.log").is_file()
    assert not (run / "trainer").exists() and not (run / "checkpoints").exists()  # no empty Trainer directory
    history = json.loads((run / "log_history.json").read_text())
    assert any("sparsity" in h for h in history)
    export_dir = run / "compressed"
    assert (export_dir / "capsparse.json").is_file() and metrics["export_bytes"] < metrics["dense_bytes"]

    # the export evaluates to the same accuracy as the run reported
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(export_dir), "--output-dir", str(tmp_path / "ev"), *_eval_flags(COMMON[:8]),
                     "--max-eval-examples", "64", "--seed", "1"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval"]
    assert ev["accuracy"] == pytest.approx(metrics["eval"]["accuracy"])
    assert ev["sparsity"] == pytest.approx(metrics["sparsity"], abs=1e-6)

    capsys.readouterr()
    assert cli.main(["predict", "--model", str(export_dir), "--text", "a great movie", "--text", "awful",
                     "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and {"label", "probabilities"} <= set(lines[0])

    # re-export in fp16: smaller still, same masks
    assert cli.main(["export", "--model", str(export_dir), "--fp16", "--output-dir", str(tmp_path / "fp16")]) == 0
    meta16 = json.loads((tmp_path / "fp16" / "capsparse.json").read_text())
    assert meta16["file_bytes"] < metrics["export_bytes"]
    assert meta16["sparsity"] == pytest.approx(metrics["sparsity"])


@needs_glue
def test_prune_block_movement_no_cap(tiny_model_dir, tmp_path):
    run = tmp_path / "block"
    code = cli.main(["prune", "--model", str(tiny_model_dir), "--method", "block-movement", "--block-size", "32",
                     "--no-cap", "--sparsity", "0.5", "--max-steps", "6", "--cap-option", "w_kd=0", "--group-by-length",
                     "--output-dir", str(run), *COMMON])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "block-movement" and metrics["use_cap"] is False
    meta = json.loads((run / "compressed" / "capsparse.json").read_text())
    assert {v["kind"] for v in meta["layers"].values()} == {"block"}
    from capsparse.export import load_compressed

    model = load_compressed(run / "compressed")
    assert all(m.block_size == (32, 32) for n, m in model.named_modules() if type(m).__name__ == "SparseLinear")


def test_export_from_zeros(tiny_model_dir, tmp_path):
    """`capsparse export` on a transformers directory takes the masks from the non-zero weights."""
    from capsparse.export import load_compressed

    model = transformers.BertForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            w = layer.intermediate.dense.weight
            w[w.abs() < w.abs().median()] = 0
    src = tmp_path / "zeros"
    model.save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(src)
    assert cli.main(["export", "--model", str(src), "--output-dir", str(tmp_path / "out")]) == 0
    loaded = load_compressed(tmp_path / "out")
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "out" / "capsparse.json").read_text())
    assert 0.05 < meta["sparsity"] < 0.5


def test_results_configs_parse_with_the_cli(tiny_model_dir, tmp_path):
    """Every scripts/run_results.py configuration is a prune command line the CLI accepts (options resolved and
    the CAPConfig built) with the method and CAP flag its label names, and every pair joins known configurations."""
    rr = load_script("run_results")
    for name, (label, flags) in rr.CONFIGS.items():
        args = cli.parse_args(["prune", "--task", "sst2", *flags, "--model", str(tiny_model_dir), "--teacher",
                               str(tiny_model_dir), "--max-steps", "10", "--output-dir", str(tmp_path / name)])
        assert args.method == flags[flags.index("--method") + 1], name
        assert bool(args.cap) == ("--cap" in flags) == label.startswith("CAP"), (name, label)
    for baseline, candidate in rr.PAIRS:
        assert baseline in rr.CONFIGS and candidate in rr.CONFIGS, (baseline, candidate)
    assert set(rr.DEFAULT_CONFIGS) <= set(rr.CONFIGS)
    soft = cli.parse_args(["prune", "--task", "sst2", *rr.CONFIGS["soft-90"][1], "--model", str(tiny_model_dir),
                           "--max-steps", "10", "--output-dir", str(tmp_path / "s")])
    assert soft.cap_options == {"score_lr": 0.1, "soft_lambda_final": 800.0}


def test_results_collect_tables_and_plot(tmp_path):
    """scripts/run_results.py collect: mean/std per configuration, paired CAP - baseline, CSV/JSON/PNG."""
    rr = load_script("run_results")
    accs = {"dense": [0.9], "movement-90": [0.80, 0.82, 0.81], "capm-90": [0.82, 0.83, 0.84]}
    for name, values in accs.items():
        for seed, acc in enumerate(values):
            d = tmp_path / name / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"eval": {"accuracy": acc}, "sparsity": 0.0 if name == "dense"
                                                        else 0.9, "wall_seconds": 60, "export_bytes": 5e7,
                                                        "train_steps": 10}))
    (tmp_path / "capm-90" / "seed3").mkdir()  # unfinished run: ignored
    res = rr.collect(tmp_path)
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["movement-90"]["mean"] == pytest.approx(81.0) and rows["movement-90"]["std"] == pytest.approx(1.0)
    assert rows["capm-90"]["n_seeds"] == 3
    (pair,) = res["paired"]
    assert pair["diff_mean"] == pytest.approx(2.0) and pair["seeds"] == [0, 1, 2]
    for f in ("results.md", "results.csv", "results.json", "accuracy_vs_sparsity.png"):
        assert (tmp_path / f).is_file(), f
    md = (tmp_path / "results.md").read_text()
    assert "| CAP-m | 90.0% | 83.00 ± 1.00 | 3 |" in md
    assert "| capm-90 vs movement-90 | 0, 1, 2 | +2.00 ± 1.00 | +2.0, +1.0, +3.0 |" in md
    assert rows["dense"]["method"] == "dense teacher"  # one dense seed: it is the teacher
    d = tmp_path / "dense" / "seed1"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"eval": {"accuracy": 0.88}, "sparsity": 0.0}))
    rows = {r["config"]: r for r in rr.collect(tmp_path)["rows"]}
    assert rows["dense"]["method"] == "dense (seed 0 is the teacher)" and rows["dense"]["mean"] == pytest.approx(89.0)
    # another task: its name in the header, F1 beside accuracy, CPU time per run
    mrpc = tmp_path / "mrpc"
    for name, (acc, f1) in {"movement-90": (0.70, 0.80), "capm-90": (0.72, 0.83)}.items():
        d = mrpc / name / "seed0"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"eval": {"accuracy": acc, "f1": f1}, "sparsity": 0.9,
                                                    "wall_seconds": 120, "cpu_seconds": 90, "train_steps": 10}))
    (mrpc / "run_meta.json").write_text(json.dumps({"budget": {"task": "mrpc", "steps": 10, "batch_size": 16,
                                                               "train_examples": 100}}))
    rr.collect(mrpc)
    md = (mrpc / "results.md").read_text()
    assert "| MRPC dev acc (mean ± std) | F1 (mean ± std) |" in md
    assert "| CAP-m | 90.0% | 72.00 ± 0.00 | 83.00 ± 0.00 | 1 | 72.0 | - | 2.0 min | 1.5 min |" in md



def test_results_merge_joins_disjoint_seeds(tmp_path):
    """scripts/run_results.py merge: two collected sets of one teacher on other seeds give one 3-seed table."""
    rr = load_script("run_results")

    def collected(name, runs, teacher=0.79):
        root = tmp_path / name
        for config, seed, acc, f1, cpu in [("dense", 0, teacher, 0.86, 600)] + runs:
            d = root / config / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"eval": {"accuracy": acc, "f1": f1}, "cpu_seconds": cpu,
                                                        "sparsity": 0.0 if config == "dense" else 0.7,
                                                        "wall_seconds": cpu, "train_steps": 10}))
        (root / "run_meta.json").write_text(json.dumps({"budget": {"task": "mrpc"}}))
        rr.collect(root)
        return root

    a = collected("a", [("movement-70", 0, 0.76, 0.84, 60), ("capm-70", 0, 0.77, 0.85, 120)])
    b = collected("b", [("movement-70", 1, 0.73, 0.82, 90), ("movement-70", 2, 0.74, 0.83, 90),
                        ("capm-70", 1, 0.76, 0.84, 150), ("capm-70", 2, 0.75, 0.83, 150)])
    res = rr.merge(tmp_path / "joined", [a, b / "results.json"])
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["movement-70"]["seeds"] == [0, 1, 2] and rows["movement-70"]["mean"] == pytest.approx(74.333, abs=1e-3)
    assert rows["capm-70"]["f1_mean"] == pytest.approx(84.0) and rows["capm-70"]["cpu_seconds_mean"] == pytest.approx(140)
    assert rows["dense"]["n_seeds"] == 1
    (pair,) = res["paired"]
    assert pair["seeds"] == [0, 1, 2] and pair["diffs"] == pytest.approx([1.0, 3.0, 1.0])
    md = (tmp_path / "joined" / "results.md").read_text()
    assert "| capm-70 vs movement-70 | 0, 1, 2 | +1.67 ± 1.15 | +1.0, +3.0, +1.0 |" in md
    assert (tmp_path / "joined" / "accuracy_vs_sparsity.png").is_file()
    with pytest.raises(ValueError, match="seed\\(s\\) \\[0\\] appear in"):
        rr.merge(tmp_path / "bad", [a, a])
    other = collected("c", [("movement-70", 3, 0.70, 0.80, 60)], teacher=0.80)
    with pytest.raises(ValueError, match="dense teacher scores"):
        rr.merge(tmp_path / "bad2", [a, other])

@needs_glue
def test_collapse_probe_script(tiny_model_dir, tmp_path):
    """scripts/collapse_probe.py: per-layer input share of [CLS], near 0 for a model whose output ignores the input."""
    probe = load_script("collapse_probe")
    # a copy of the tiny model whose last FFN adds a huge constant to [CLS]: its LayerNorm sees one input
    collapsed = tmp_path / "collapsed"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.bert.encoder.layer[-1].output.dense.bias.fill_(0.0)[0] = 1e6
    model.save_pretrained(collapsed)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(collapsed)
    out = tmp_path / "probe"
    assert probe.main([str(tiny_model_dir), str(collapsed), "--out", str(out), "--examples", "32", "--threads", "1"]) == 0
    rows = json.loads((out / "collapse.json").read_text())["rows"]
    assert [len(r["input_share_per_layer"]) for r in rows] == [2, 2]
    healthy, dead = rows
    assert dead["input_share_per_layer"][-1] < 1e-3 < healthy["input_share_per_layer"][-1]
    assert dead["input_share_per_layer"][0] == pytest.approx(healthy["input_share_per_layer"][0], rel=1e-4)
    assert dead["predicted_class_share"] == 1.0 and dead["logit_std"] < healthy["logit_std"]
    assert (out / "collapse.md").read_text().count("| ") > 2
    with pytest.raises(SystemExit):
        probe.main([str(tmp_path / "missing")])
    # sentence pairs: MRPC's dev pairs go through the tokenizer as pairs (token_type_ids 1 on the second)
    pairs = tmp_path / "probe-mrpc"
    assert probe.main([str(collapsed), "--task", "mrpc", "--out", str(pairs), "--examples", "16", "--threads", "1"]) == 0
    (row,) = json.loads((pairs / "collapse.json").read_text())["rows"]
    assert row["input_share_per_layer"][-1] < 1e-3 and row["predicted_class_share"] == 1.0
    assert "16 MRPC dev examples" in (pairs / "collapse.md").read_text()


@needs_glue
def test_attention_probe_script(tiny_model_dir, tmp_path):
    """scripts/attention_probe.py: zero KL for an export of the teacher itself, uniform rows (entropy ln n) and a
    positive KL for a student whose query projections are zero."""
    probe = load_script("attention_probe")
    same, flat = tmp_path / "same", tmp_path / "flat"
    assert cli.main(["export", "--model", str(tiny_model_dir), "--output-dir", str(same)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.zero_()
            layer.attention.self.query.bias.zero_()
    src = tmp_path / "flat-src"
    model.save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(src)
    assert cli.main(["export", "--model", str(src), "--output-dir", str(flat)]) == 0
    out = tmp_path / "attention.json"
    assert probe.main([str(tiny_model_dir), str(same), str(flat), "--task", "mrpc", "--examples", "4",
                       "--out", str(out)]) == 0
    table = json.loads(out.read_text())["models"]
    assert max(table[str(same)]["kl_from_teacher"]) < 1e-5
    assert table[str(same)]["entropy"] == pytest.approx(table["teacher"]["entropy"], rel=1e-5)
    from capsparse.data import load_glue

    dev = load_glue("mrpc", "validation")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok(list(dev["sentence1"][:4]), list(dev["sentence2"][:4]), truncation=True, max_length=128)
    lengths = torch.tensor([len(ids) for ids in enc["input_ids"]], dtype=torch.float64)
    want = float((lengths * lengths.log()).sum() / lengths.sum())  # each real row is uniform over its n tokens
    assert table[str(flat)]["entropy"] == pytest.approx([want] * 2, rel=1e-4)
    # KL(t || uniform) = ln n - H(t) row by row
    assert table[str(flat)]["kl_from_teacher"] == pytest.approx([want - h for h in table["teacher"]["entropy"]],
                                                                rel=1e-3, abs=1e-6)
    assert len(table["teacher"]["cross_share"]) == 2


@needs_glue
def test_demo_tiny_budget(tiny_model_dir, tmp_path, capsys):
    """`capsparse demo` end to end on a tiny model: teacher, CAP-m and movement rows, exports, table, hint."""
    out = tmp_path / "demo"
    code = cli.main(["demo", "--model", str(tiny_model_dir), "--quick", "--train-examples", "64", "--teacher-steps",
                     "2", "--prune-steps", "6", "--max-eval-examples", "48", "--batch-size", "16",
                     "--output-dir", str(out), "--seed", "3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    methods = [r["method"] for r in metrics["rows"]]
    assert methods == ["dense teacher", "CAP-m", "movement"]
    for row in metrics["rows"][1:]:
        assert row["sparsity"] == pytest.approx(0.9, abs=0.01) and 0 < row["bytes"] < metrics["rows"][0]["bytes"]
    table = (out / "demo_table.md").read_text()
    assert "CAP-m" in table and "| vs majority class |" in table
    for sub in ("teacher", "cap-m", "movement"):
        assert (out / sub / "metrics.json").is_file()
    captured = capsys.readouterr()
    assert "Full-size recipe" in captured.out
    # the table carries the majority-class share and the CAP - baseline difference, as measured
    from capsparse.app.demo import _majority_share
    import transformers as tf

    share = _majority_share(tf.AutoTokenizer.from_pretrained(tiny_model_dir),
                            {"glue_dir": None, "max_length": 64, "seed": 3}, 48)
    assert 0.5 <= share <= 1.0 and metrics["majority_share"] == pytest.approx(share)
    assert f"Majority-class share of the evaluated dev examples: {100 * share:.2f}%." in table
    gain = metrics["rows"][1]["accuracy"] - metrics["rows"][2]["accuracy"]
    assert metrics["cap_minus_baseline"] == pytest.approx(gain)
    assert f"CAP - baseline (CAP-m minus movement, same budget and seed): {100 * gain:+.2f} points." in table
    for row in metrics["rows"]:
        assert f"| {100 * row['accuracy']:.2f} | {100 * (row['accuracy'] - share):+.2f} |" in table
    # the collapse warning goes to stderr exactly when a pruned model sits at the majority-class share
    collapsed = any(r["accuracy"] - share < 0.01 for r in metrics["rows"][1:])
    assert ("predicts one class" in captured.err) == collapsed and "predicts one class" not in captured.out
    for name in ("docs/", ".md"):
        for ref in [w for w in captured.out.split() if name in w]:
            assert (Path(__file__).resolve().parents[1] / ref.strip("().,:;'")).exists(), ref


def test_demo_refuses_an_earlier_demo_directory(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("not a demo")
    assert cli.main(["demo", "--output-dir", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "notes.txt").is_file()
    assert cli.main(["demo", "--output-dir", str(out), "--overwrite"]) == 2
    assert "not a capsparse demo directory" in capsys.readouterr().err and (out / "notes.txt").is_file()


@needs_glue
def test_movement_probe_script(tiny_model_dir, tmp_path):
    """scripts/movement_probe.py on a tiny model: one row per criterion and fraction, consistent salient shares."""
    probe = load_script("movement_probe")
    out = tmp_path / "probe"
    assert probe.main(["--model", str(tiny_model_dir), "--out", str(out), "--steps", "3", "--train-examples", "64",
                       "--fractions", "0.25", "0.5", "--max-length", "32", "--threads", "1",
                       "--importance-stream", "same", "--anchor-scales", "1", "4"]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["criteria"][:3] == ["movement", "anchored x1", "anchored x4"]
    moment = result["second_moment"]
    assert 0.0 <= moment["share_below_10eps"] <= 1.0 and -1.0 <= moment["spearman_sqrt_v_saliency"] <= 1.0
    rows = result["rows"]
    assert [(r["fraction_pruned"], r["criterion"]) for r in rows] == [(f, c) for f in (0.25, 0.5)
                                                                       for c in result["criteria"]]
    for r in rows:
        assert 0.0 <= r["dev_accuracy"] <= 1.0 and 0.0 <= r["salient_removed"] <= 1.0
        if r["criterion"] == "abs-taylor":  # ranks by the saliency itself: the top 1% is always kept
            assert r["salient_removed"] == 0.0
    table_rows = [line for line in (out / "probe.md").read_text().splitlines() if line.startswith(("| 25.0%", "| 50.0%"))]
    assert len(table_rows) == 2 and all(line.count("|") == len(result["criteria"]) + 2 for line in table_rows)
    with pytest.raises(SystemExit):
        probe.main(["--model", str(tiny_model_dir), "--fractions", "1.5"])


@needs_glue
def test_prune_under_torchrun_two_processes(tiny_model_dir, tmp_path):
    """`torchrun -m capsparse prune` with 2 processes: exits 0, rank 0 alone evaluates and writes the run's files."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp-prune"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               CAPSPARSE_GLUE_DIR=str(GLUE))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "capsparse", "prune", "--model", str(tiny_model_dir), "--teacher",
                           str(tiny_model_dir), "--method", "movement", "--cap", "--sparsity", "0.5", "--max-steps", "4",
                           "--batch-size", "8", *COMMON[:2], "--max-length", "32", "--max-train-examples", "64",
                           "--max-eval-examples", "32", "--output-dir", str(out)],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("prune done") == 1  # rank 1 does not evaluate or report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    for f in ("config.json", "cap_config.json", "run.log", "log_history.json", "compressed/capsparse.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp"))
