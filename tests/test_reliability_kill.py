"""Crash-and-resume with real processes: SIGKILL at seeded random points, resume, compare bit for bit.

``tests/_killrun.py`` is a tiny run through the Hugging Face ``Trainer`` with capsparse's atomic manifested
checkpoints (a block-sparse SparseLinear, AdamW, dropout, shuffled data). Each kill point is an
``(event, occurrence)`` pair drawn from a seeded generator: during a step (after forward / backward / the
optimizer step) or inside a checkpoint write (files written without a manifest, inside the manifest write). One
more run is killed by the parent at a random wall-clock time. After every kill the next run resumes from the
newest valid checkpoint; the final weights, masks, optimizer state and per-step losses must equal an
uninterrupted run's exactly.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsparse import checkpoint as ck

SCRIPT = Path(__file__).with_name("_killrun.py")
EVENT_RANGES = {"fwd": 12, "bwd": 12, "opt": 12, "ckpt.files": 3, "ckpt.before_manifest": 3}
N_EVENT_KILLS = 5  # each run starts a Python with torch and transformers: a few seconds on 2 shared cores
N_TIMER_KILLS = 1
STATS_FILE = os.environ.get("CAPSPARSE_RELIABILITY_STATS")


def _pinned_backend():
    """The backend every run of this module uses: the CPU default, resolved once (a backend that appears or
    changes between the baseline and a resumed run would change the last bits)."""
    from capsparse.backends import available_backends

    return "cpu" if available_backends()["cpu"][0] else "reference"


BACKEND = os.environ.get("CAPSPARSE_BACKEND") or _pinned_backend()


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="COMPATIBLE", PYTHONWARNINGS="ignore",
                CAPSPARSE_BACKEND=BACKEND)


def run(run_dir, *extra, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(run_dir), *extra], capture_output=True,
                          text=True, timeout=timeout, env=_env())


def run_killed_at_random_time(run_dir, rng):
    """Start a run, wait for READY (imports done), sleep a random time, SIGKILL it. Returns the return code."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--run-dir", str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env())
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(rng.uniform(0.0, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


def _bits(t):
    return t if t.dtype == torch.bool else t.reshape(-1).view(torch.uint8)


def _final(run_dir: Path):
    from safetensors.torch import load_file

    final = run_dir / "final"
    return load_file(str(final / "state.safetensors")), json.loads((final / "state.json").read_text())


def assert_same_final(a: Path, b: Path):
    (ta, ma), (tb, mb) = _final(a), _final(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(_bits(ta[k]), _bits(tb[k])), f"{k} differs"
    assert ma == mb  # per-step losses, step count


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("baseline")
    r = run(d)
    assert r.returncode == 0, r.stderr
    return d


def _record(key, value):
    if STATS_FILE:
        path = Path(STATS_FILE)
        stats = json.loads(path.read_text()) if path.exists() else {}
        stats[key] = value
        path.write_text(json.dumps(stats, indent=1, sort_keys=True))


def test_sigkill_at_random_points_then_resume_is_bit_identical(baseline, tmp_path):
    rng = random.Random(20240610)
    events = sorted(EVENT_RANGES)
    fired, completed_early, chains, log = 0, 0, 0, []
    run_dir = tmp_path / "chain0"
    while fired < N_EVENT_KILLS:
        name = rng.choice(events)
        point = f"{name}:{rng.randint(1, EVENT_RANGES[name])}"
        r = run(run_dir, "--kill-at", point)
        if r.returncode == -signal.SIGKILL:
            fired += 1
            log.append(point)
            continue
        assert r.returncode == 0, f"kill point {point}: {r.stderr[-2000:]}"
        completed_early += 1  # the point lay past the end of the remaining work: this chain is done
        assert_same_final(baseline, run_dir)
        chains += 1
        run_dir = tmp_path / f"chain{chains}"
    timer_fired = 0
    for _ in range(N_TIMER_KILLS):
        rc = run_killed_at_random_time(run_dir, rng)
        timer_fired += rc == -signal.SIGKILL
    r = run(run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_final(baseline, run_dir)
    _record("kill", {"backend": BACKEND, "event_kills": fired, "event_points": log, "timer_kills": timer_fired,
                     "chains": chains + 1, "all_recovered": True})


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "drop_manifest", "delete_file"])
def test_damaged_latest_checkpoint_is_detected_and_previous_used(baseline, tmp_path, damage, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    shutil.rmtree(run_dir / "final")
    newest, previous = ck.list_checkpoints(run_dir)[:2]
    target = newest / "model.safetensors"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (newest / ck.MANIFEST_NAME).unlink()
    else:
        (newest / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="capsparse.checkpoint"):
        assert ck.latest_valid_checkpoint(run_dir) == previous
    expected = {"truncate": "model.safetensors", "bitflip": "model.safetensors", "drop_manifest": "manifest.json",
                "delete_file": "trainer_state.json"}[damage]
    assert expected in caplog.text and newest.name in caplog.text
    if damage not in ("truncate", "bitflip"):
        return  # resuming from the previous checkpoint is the same path; two subprocess runs cover it
    r = run(run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"RESUMED {previous.name}" in r.stdout
    assert_same_final(baseline, run_dir)
