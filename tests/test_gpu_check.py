"""scripts/gpu_check.py on the CPU: the dry run lists every step; a run keeps partial results."""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_the_steps(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "out"), "--dry-run"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("environment", "install", "gpu_tests", "cap_training_steps", "compute_sanitizer_memcheck",
                 "benchmarks"):
        assert name in proc.stdout, name
    assert "--no-deps --no-build-isolation" in proc.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_run_keeps_partial_results_and_reports_failures(tmp_path, monkeypatch):
    gc = _load()
    fake = [("ok_step", [sys.executable, "-c", "print('{\"x\": 1}')"], 30, True),
            ("slow_step", [sys.executable, "-c", "import time; time.sleep(30)"], 1, False),
            ("missing_tool", ["capsparse-no-such-tool"], 5, False)]
    monkeypatch.setattr(gc, "steps", lambda out_dir: fake)
    assert gc.main([str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    by_name = {s["name"]: s for s in report["steps"]}
    assert by_name["ok_step"]["rc"] == 0 and by_name["ok_step"]["result"] == {"x": 1}
    assert by_name["slow_step"]["rc"] == "timeout" and by_name["missing_tool"]["rc"] == "not found"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| ok_step | ok |" in md and "| slow_step | FAILED (timeout) |" in md
