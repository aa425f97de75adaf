"""Unit tests of capsparse.checkpoint: atomic files and directories, manifests, verification, safe loading."""
from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch

from capsparse import checkpoint as ck


def _write_ckpt(run_dir, step, value=1.0):
    return ck.save_checkpoint(run_dir, step, {"w": torch.full((4, 4), float(value)), "m": torch.ones(4, dtype=torch.bool)},
                              {"step": step})


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    ck.atomic_write_text(p, "one")
    ck.atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "a.bin"
    ck.atomic_write_bytes(p, b"old")
    with pytest.raises(RuntimeError):
        with ck.atomic_write(p) as f:
            f.write(b"partial new data")
            raise RuntimeError("crash while writing")
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]


def test_checkpoint_dir_roundtrip_and_manifest(tmp_path):
    path = _write_ckpt(tmp_path, 3, 2.5)
    assert path.name == "ckpt-3" and not (tmp_path / "ckpt-3.tmp").exists()
    manifest = ck.verify_checkpoint(path)
    assert set(manifest["files"]) == {"state.safetensors", "state.json"}
    tensors, meta = ck.load_state(path)
    assert torch.equal(tensors["w"], torch.full((4, 4), 2.5)) and tensors["m"].dtype == torch.bool
    assert meta == {"step": 3}


def test_failed_checkpoint_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ck.atomic_checkpoint_dir(tmp_path / "ckpt-1") as tmp:
            ck.save_state(tmp, {"w": torch.zeros(2)}, {})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "'state.safetensors' is truncated"),
    ("grow", "'state.safetensors' has the wrong size"),
    ("bitflip", "'state.safetensors' is corrupted"),
    ("missing", "'state.json' listed in the manifest is missing"),
    ("no_manifest", "manifest.json is missing"),
    ("bad_manifest", "corrupted manifest"),
])
def test_verify_names_the_bad_file(tmp_path, damage, needle):
    path = _write_ckpt(tmp_path, 1)
    st = path / "state.safetensors"
    data = st.read_bytes()
    if damage == "truncate":
        st.write_bytes(data[:-7])
    elif damage == "grow":
        st.write_bytes(data + b"\0")
    elif damage == "bitflip":
        st.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "missing":
        (path / "state.json").unlink()
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
    else:
        (path / "manifest.json").write_text("{ not json")
    with pytest.raises(ck.CheckpointError, match="ckpt-1") as exc:
        ck.verify_checkpoint(path)
    assert needle in str(exc.value)
    with pytest.raises(ck.CheckpointError):
        ck.load_state(path, verify=True)


def test_latest_valid_skips_broken_with_warning(tmp_path, caplog):
    for s in (2, 4, 6):
        _write_ckpt(tmp_path, s, s)
    (tmp_path / "ckpt-6" / "state.safetensors").write_bytes(b"x")
    (tmp_path / "ckpt-8").mkdir()  # a directory without a manifest: an interrupted in-place writer
    (tmp_path / "ckpt-9.tmp").mkdir()  # an interrupted atomic write
    with caplog.at_level(logging.WARNING, logger="capsparse.checkpoint"):
        assert ck.latest_valid_checkpoint(tmp_path) == tmp_path / "ckpt-4"
    assert "ckpt-6" in caplog.text and "state.safetensors" in caplog.text and "ckpt-8" in caplog.text
    assert not (tmp_path / "ckpt-9.tmp").exists()
    assert ck.latest_valid_checkpoint(tmp_path / "nothing-here") is None


def test_interrupted_rename_is_recovered(tmp_path):
    _write_ckpt(tmp_path, 5)
    os.replace(tmp_path / "ckpt-5", tmp_path / "ckpt-5.tmp")  # killed after the manifest, before the rename
    assert ck.latest_valid_checkpoint(tmp_path) == tmp_path / "ckpt-5"
    _write_ckpt(tmp_path, 7)
    os.replace(tmp_path / "ckpt-7", tmp_path / "ckpt-7.old")  # killed while replacing an existing ckpt-7
    assert ck.latest_valid_checkpoint(tmp_path) == tmp_path / "ckpt-7"


def test_rotation_never_counts_broken(tmp_path):
    for s in (1, 2, 3):
        _write_ckpt(tmp_path, s)
    (tmp_path / "ckpt-3" / "manifest.json").unlink()
    ck.rotate_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-2", "ckpt-3"]
    with pytest.raises(ValueError, match="keep_last"):
        ck.rotate_checkpoints(tmp_path, keep_last=0)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "state.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil(str(marker))}, f)
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        ck.load_tensors(evil)
    with pytest.raises(ck.CheckpointError):
        ck.load_state(tmp_path)
    with pytest.raises(ck.CheckpointError):
        ck.safe_torch_load(evil)
    assert not marker.exists()
    # a torch.save'd zip pickle with a code-running object is refused the same way
    evil2 = tmp_path / "evil2.pt"
    torch.save({"w": _Evil(str(marker))}, evil2)
    with pytest.raises(ck.CheckpointError):
        ck.load_tensors(evil2)
    assert not marker.exists()


def test_legacy_pt_tensors_load(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "state.pt")
    tensors, meta = ck.load_state(tmp_path)
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta == {}


def test_save_state_validates_arguments(tmp_path):
    with pytest.raises(TypeError, match="tensors"):
        ck.save_state(tmp_path, [torch.zeros(1)], {})
    with pytest.raises(TypeError, match="tensors"):
        ck.save_state(tmp_path, {"a": 1.0}, {})
    with pytest.raises(TypeError, match="meta"):
        ck.save_state(tmp_path, {"a": torch.zeros(1)}, {"x": object()})
    with pytest.raises(ValueError, match="step"):
        ck.save_checkpoint(tmp_path, -1, {}, {})
    with pytest.raises(ValueError, match="name"):
        ck.save_state(tmp_path, {}, {}, name="../x")


def test_shared_storage_and_views_are_saved(tmp_path):
    base = torch.arange(16.0)
    ck.save_state(tmp_path, {"a": base, "b": base[:4], "c": base.reshape(4, 4).t()}, {})
    t, _ = ck.load_state(tmp_path)
    assert torch.equal(t["b"], base[:4]) and torch.equal(t["c"], base.reshape(4, 4).t())


def test_flatten_tree_roundtrips_optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    tensors, skel = ck.flatten_tree(sd, "optim")
    json.dumps(skel)
    back = ck.unflatten_tree(json.loads(json.dumps(skel)), tensors)
    assert set(back["state"]) == {0, 1}
    assert torch.equal(back["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])
    opt.load_state_dict(back)


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    g = torch.Generator().manual_seed(7)
    tensors, meta = ck.capture_rng_state({"g": g})
    ck.save_state(tmp_path, tensors, meta)
    expected = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g))
    t2, m2 = ck.load_state(tmp_path)
    ck.restore_rng_state(t2, m2, {"g": g})
    got = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2]) and torch.equal(expected[3], got[3])
