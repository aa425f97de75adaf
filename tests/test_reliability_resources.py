"""Free-memory queries, Ctrl-C handling, and the Hugging Face Trainer path (atomic manifested
``checkpoint-N``, SIGINT -> checkpoint + clean exit, SIGKILL -> resume) with real subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsparse import checkpoint as ck
from capsparse import resources as rs

SCRIPT = Path(__file__).with_name("_killrun.py")


def test_measured_free_resources(tmp_path):
    assert rs.available_ram() > 0
    assert rs.available_gpu_memory() is None or rs.available_gpu_memory() > 0


def test_graceful_stop_in_process():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup / background jobs, else the default handler
    with rs.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


def _popen(run_dir, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_CBWR="COMPATIBLE", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(SCRIPT), "trainer", "--run-dir", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"{prefix!r} never printed; stderr: {proc.stderr.read()[-2000:]}")


def _final(run_dir):
    import json

    from safetensors.torch import load_file

    final = Path(run_dir) / "final"
    return load_file(str(final / "state.safetensors")), json.loads((final / "state.json").read_text())


def test_trainer_sigint_checkpoint_then_sigkill_then_resume_is_bit_identical(tmp_path):
    base = _popen(tmp_path / "base")
    out, err = base.communicate(timeout=300)
    assert base.returncode == 0, err[-2000:]

    run_dir = tmp_path / "run"
    proc = _popen(run_dir, "--step-sleep", "0.3")
    _wait_for(proc, "STEP 5")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = int(out.split("STOPPED at ")[1].split()[0])
    assert 5 <= stopped < 16
    ckpt = run_dir / f"checkpoint-{stopped}"
    assert ck.verify_checkpoint(ckpt)["extra"]["global_step"] == stopped

    proc = _popen(run_dir, "--step-sleep", "0.05")
    _wait_for(proc, f"STEP {stopped + 3}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (ck.list_checkpoints(run_dir)[0] / ck.MANIFEST_NAME).unlink()  # the newest one is also left incomplete

    proc = _popen(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "DONE" in out
    (ta, ma), (tb, mb) = _final(tmp_path / "base"), _final(run_dir)
    assert ma == mb and sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert any(p.name.startswith("broken-checkpoint-") for p in run_dir.iterdir())
