"""Unit tests of capsparse.checkpoint: atomic files, manifests, verification, resume selection, safe loading."""
from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch

from capsparse import checkpoint as ck


def _write_ckpt(run_dir, step, value=1.0):
    """A ``checkpoint-N`` as the Trainer leaves it (files written in place), then its manifest."""
    from safetensors.torch import save_file

    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), float(value))}, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    ck.write_manifest(path, extra={"global_step": step})
    return path


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    ck.atomic_write_json(p, {"v": 1})
    ck.atomic_write_json(p, {"v": 2})
    assert p.read_text() == '{\n "v": 2\n}'
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "a.bin"
    with ck.atomic_write(p) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError):
        with ck.atomic_write(p) as f:
            f.write(b"partial new data")
            raise RuntimeError("crash while writing")
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]
    with pytest.raises(ValueError, match="mode"):
        with ck.atomic_write(p, "a"):
            pass


def test_manifest_lists_every_file(tmp_path):
    path = _write_ckpt(tmp_path, 3)
    manifest = ck.verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.safetensors", "trainer_state.json"}
    assert manifest["extra"] == {"global_step": 3}


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "'model.safetensors' is truncated"),
    ("grow", "'model.safetensors' has the wrong size"),
    ("bitflip", "'model.safetensors' is corrupted"),
    ("missing", "'trainer_state.json' listed in the manifest is missing"),
    ("no_manifest", "manifest.json is missing"),
    ("bad_manifest", "corrupted manifest"),
])
def test_verify_names_the_bad_file(tmp_path, damage, needle):
    path = _write_ckpt(tmp_path, 1)
    st = path / "model.safetensors"
    data = st.read_bytes()
    if damage == "truncate":
        st.write_bytes(data[:-7])
    elif damage == "grow":
        st.write_bytes(data + b"\0")
    elif damage == "bitflip":
        st.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "missing":
        (path / "trainer_state.json").unlink()
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
    else:
        (path / "manifest.json").write_text("{ not json")
    with pytest.raises(ck.CheckpointError, match="checkpoint-1") as exc:
        ck.verify_checkpoint(path)
    assert needle in str(exc.value)


def test_latest_valid_skips_broken_with_warning(tmp_path, caplog):
    for s in (2, 4, 6):
        _write_ckpt(tmp_path, s, s)
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-8").mkdir()  # a directory without a manifest: the Trainer was killed while writing it
    with caplog.at_level(logging.WARNING, logger="capsparse.checkpoint"):
        assert ck.latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "checkpoint-6" in caplog.text and "model.safetensors" in caplog.text and "checkpoint-8" in caplog.text
    assert ck.latest_valid_checkpoint(tmp_path / "nothing-here") is None


def test_resume_moves_broken_checkpoints_aside(tmp_path, caplog):
    for s in (2, 4):
        _write_ckpt(tmp_path, s)
    (tmp_path / "checkpoint-4" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="capsparse.checkpoint"):
        assert ck.resolve_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-checkpoint-4", "checkpoint-2"]
    assert "manifest.json is missing" in caplog.text
    assert ck.resolve_resume_checkpoint(tmp_path, None) is None
    with pytest.raises(ck.CheckpointError, match="broken-checkpoint-4"):
        ck.resolve_resume_checkpoint(tmp_path, str(tmp_path / "broken-checkpoint-4"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_cap_state_cannot_run_code(tmp_path):
    """CAPTrainer's resume reads cap_state.pt weights-only: a pickle that would create a file is refused."""
    from capsparse.cap.trainer import CAP_STATE_NAME, CAPTrainer

    marker = tmp_path / "pwned"
    for name, dump in (("raw", lambda obj, f: pickle.dump(obj, f)), ("torch.save", torch.save)):
        ckpt = tmp_path / name
        ckpt.mkdir()
        with open(ckpt / CAP_STATE_NAME, "wb") as f:
            dump({"banks": _Evil(str(marker))}, f)
        with pytest.raises(pickle.UnpicklingError):
            CAPTrainer._load_cap_state(object(), str(ckpt))  # refused before the trainer is touched
        assert not marker.exists()
