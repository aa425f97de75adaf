"""`capsparse prune --save-steps N` / `--resume` through the CLI, in real processes: a run SIGKILLed (or stopped by
SIGTERM) after its first checkpoint and resumed with --resume ends with a compressed export byte-identical to an
uninterrupted run's (every
file; in model.safetensors the tensor bytes, and the header as parsed JSON: see _safetensors_parts); a
rerun into a used run directory is refused (exit 2) and leaves it untouched; --overwrite replaces it whole."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny import tiny_config  # noqa: E402
from capsparse.data import resolve_glue_dir  # noqa: E402

GLUE = resolve_glue_dir()
pytestmark = pytest.mark.skipif(GLUE is None or not (Path(GLUE) / "SST-2" / "train.tsv").is_file(),
                                reason="SST-2 not found in the local GLUE directory")


def _pinned_backend():
    from capsparse.backends import available_backends

    return "cpu" if available_backends()["cpu"][0] else "reference"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from capsparse.models import default_model_path

    path = tmp_path_factory.mktemp("tiny-resume")
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(tiny_config(vocab=tok.vocab_size)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="COMPATIBLE", PYTHONWARNINGS="ignore",
                CUDA_VISIBLE_DEVICES="", CAPSPARSE_BACKEND=os.environ.get("CAPSPARSE_BACKEND") or _pinned_backend(),
                CAPSPARSE_GLUE_DIR=str(GLUE))


def _argv(model, out, *extra):
    return [sys.executable, "-m", "capsparse", "prune", "--model", str(model), "--teacher", str(model),
            "--method", "movement", "--cap", "--sparsity", "0.5", "--max-steps", "12", "--save-steps", "4",
            "--batch-size", "8", "--max-length", "32", "--max-train-examples", "64", "--max-eval-examples", "16",
            "--logging-steps", "4", "--cap-option", "n_extra_keys=8", "--seed", "1", "--threads", "1",
            "--output-dir", str(out), *extra]


def _run(argv, timeout=300):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())


def _safetensors_parts(data: bytes):
    """``(header as a dict, tensor bytes)``: safetensors writes its ``__metadata__`` map in hash order, which
    differs between processes, so the header is compared parsed and everything after it byte for byte."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _files(directory: Path):
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[p.relative_to(directory).as_posix()] = _safetensors_parts(data) if p.suffix == ".safetensors" else data
    return out


@pytest.fixture(scope="module")
def whole(tiny_dir, tmp_path_factory):
    """An uninterrupted run: the export every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("resume") / "whole"
    proc = _run(_argv(tiny_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "trainer").exists()  # no empty Trainer directory left behind
    return out


def _start_and_signal_after_first_checkpoint(argv, out: Path, signum: int):
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    manifest = out / "checkpoints" / "checkpoint-4" / "manifest.json"
    deadline = time.monotonic() + 240
    while not manifest.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signum)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


def test_sigterm_stops_with_a_checkpoint_and_no_results_then_resume_finishes(tiny_dir, whole, tmp_path):
    """SIGTERM (what a scheduler or `kill` sends) stops after the current step and a checkpoint: the run exits with
    143, names the step and --resume, and leaves no metrics.json and no export, so that nothing reads it as a
    finished run; --resume then finishes it with the uninterrupted run's export."""
    stopped = tmp_path / "stopped"
    code, stderr = _start_and_signal_after_first_checkpoint(_argv(tiny_dir, stopped), stopped, signal.SIGTERM)
    assert code != 0, "the run ended before it could be stopped"
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stderr and "of 12" in stderr and "--resume" in stderr
    assert not (stopped / "metrics.json").exists() and not (stopped / "compressed").exists()
    assert any((stopped / "checkpoints").glob("checkpoint-*/manifest.json"))
    proc = _run(_argv(tiny_dir, stopped, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((stopped / "metrics.json").read_text())["train_steps"] == 12
    assert _files(stopped / "compressed") == _files(whole / "compressed")


def test_sigkill_then_resume_gives_the_same_export(tiny_dir, whole, tmp_path):
    killed = tmp_path / "killed"
    code, _ = _start_and_signal_after_first_checkpoint(_argv(tiny_dir, killed), killed, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "metrics.json").exists()

    proc = _run(_argv(tiny_dir, killed))  # a plain rerun is refused and changes nothing
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "--resume" in proc.stderr
    proc = _run(_argv(tiny_dir, killed, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing from" in (killed / "run.log").read_text()

    assert _files(killed / "compressed") == _files(whole / "compressed")

    proc = _run(_argv(tiny_dir, killed, "--resume"))  # a finished run is not resumed
    assert proc.returncode == 2 and "finished run" in proc.stderr


def test_resume_with_other_options_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"command": "prune", "options": {"sparsity": 0.9}}')
    proc = _run(_argv(tiny_dir, out, "--resume"))
    assert proc.returncode == 2 and "--resume: the options differ" in proc.stderr and "sparsity" in proc.stderr


def test_overwrite_replaces_the_whole_directory(tiny_dir, tmp_path, capsys):
    from capsparse import cli

    out = tmp_path / "export"
    assert cli.main(["export", "--model", str(tiny_dir), "--output-dir", str(out)]) == 0
    (out / "stale.txt").write_text("from the old export")
    assert cli.main(["export", "--model", str(tiny_dir), "--output-dir", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "stale.txt").is_file()
    assert cli.main(["export", "--model", str(tiny_dir), "--output-dir", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "capsparse.json").is_file()
