"""Each benchmark's code path in a tiny configuration: correct outputs and files written.

Timings are never asserted (the machine is shared and noisy); only structure and correctness.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def load(name):
    spec = importlib.util.spec_from_file_location(f"test_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(out: Path, stem: str, png: bool = True) -> dict:
    assert (out / f"{stem}.csv").stat().st_size > 0
    data = json.loads((out / f"{stem}.json").read_text())
    meta = data["meta"]
    for key in ("machine", "torch", "transformers", "git_sha", "date_utc", "torch_threads"):
        assert meta[key] not in (None, "")
    if png:
        assert (out / f"{stem}.png").stat().st_size > 0
    return data


# -- harness ---------------------------------------------------------------------------------------------
def test_harness_measure_and_ratio():
    H = load("_harness")
    calls = []
    t = H.measure(lambda: calls.append(1), warmup=2, reps=3)
    assert len(calls) == 5 and t["reps"] == 3 and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    res = H.measure_interleaved({"a": lambda: None, "bad": lambda: 1 / 0}, warmup=1, reps=2)
    assert res["a"]["reps"] == 2 and "ZeroDivisionError" in res["bad"]["error"]
    assert H.ratio(10.0, 5.0) == 2.0 and H.ratio(None, 1.0) is None
    with pytest.raises(ValueError):
        H.measure(lambda: None, reps=0)


def test_harness_peak_memory_sees_an_allocation():
    H = load("_harness")
    with H.PeakMemory("cpu") as pm:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MB, touched
        del x
    assert pm.method and pm.peak_mb is not None and pm.peak_mb >= 0
    if pm.method.startswith("VmHWM"):
        assert pm.peak_mb > 32


def test_harness_report_not_available_rows(tmp_path):
    H = load("_harness")
    import argparse
    report = H.Report("unit", argparse.Namespace(quick=True, output_dir=tmp_path))
    report.add(case="a", median_ms=1.0)
    report.na("no GPU", case="b")
    paths = report.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["quick"] and [r["status"] for r in data["rows"]] == ["ok", "not available: no GPU"]
    assert "not available: no GPU" in report.table()


# -- suites ------------------------------------------------------------------------------------------------
def test_contrastive_matches_naive_loss(tmp_path):
    mod = load("bench_contrastive")
    report = mod.main(["--batch", "4", "--dims", "16", "--extras", "64", "--reps", "1", "--warmup", "0",
                       "--output-dir", str(tmp_path)])
    data = _read(tmp_path, "contrastive")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"naive torch (B x K masks)", "capsparse auto", "capsparse reference"}
    assert all(r["max_abs_err"] < 1e-4 for r in ok)
    if not torch.cuda.is_available():
        gpu = [r for r in report.rows if r["provider"] in ("capsparse triton", "capsparse cuda")]
        assert gpu and all(r["status"] == "not available: no GPU" for r in gpu)


def test_naive_loss_matches_capsparse_reference():
    mod = load("bench_contrastive")
    from capsparse.ops import cap_contrastive_loss_reference
    x = mod.make_inputs(5, 8, extras=40, n_examples=200)
    lu, ls = mod.naive_cap_loss(x["query"], x["keys"], x["query_ids"], x["key_ids"], x["query_labels"],
                                x["key_labels"], x["exclude_index"])
    ru, rs = cap_contrastive_loss_reference(x["query"], x["keys"], x["query_ids"], x["key_ids"], x["query_labels"],
                                            x["key_labels"], temperature=0.1, exclude_index=x["exclude_index"])
    torch.testing.assert_close(lu, ru, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ls, rs, rtol=1e-5, atol=1e-6)


def test_kernels_tiny(tmp_path):
    mod = load("bench_kernels")
    report = mod.main(["--shapes", "mini_attn", "--tokens", "32", "--sparsities", "0", "0.9", "--blocks", "32",
                       "--reps", "1", "--warmup", "0", "--no-contrastive", "--output-dir", str(tmp_path)])
    data = _read(tmp_path, "kernels")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["pass_"] for r in ok} == {"fwd", "dX", "dW"}
    assert any(r["provider"] == "block_sparse_linear[reference]" for r in ok)
    assert any(r["provider"] == "torch bsr" for r in ok) and any(r["provider"] == "torch csr" for r in ok)
    for r in ok:
        if r.get("max_abs_err") is not None:
            assert r["max_abs_err"] < 1e-3, r
    if not torch.cuda.is_available():
        assert all(r["status"] == "not available: no GPU" for r in report.rows
                   if r["provider"].endswith(("[triton]", "[cuda]")))


def test_banks_tiny(tmp_path):
    mod = load("bench_banks")
    mod.main(["--sizes", "64", "128", "--dim", "8", "--batch", "16", "--reps", "1", "--output-dir", str(tmp_path)])
    data = _read(tmp_path, "banks")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"per-batch torch.cat (official)", "pre-allocated index write"}
    assert all(r["same_contents"] for r in ok)
    assert any("projected per-batch cat at QQP" in n for n in data["notes"])


def test_train_step_tiny(tmp_path):
    mod = load("bench_train_step")
    mod.main(["--models", "tiny", "--batch", "2", "--length", "8", "--sparsities", "0.5", "--n-examples", "300",
              "--extra-keys", "64", "--reps", "1", "--warmup", "0", "--output-dir", str(tmp_path)])
    data = _read(tmp_path, "train_step")
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == set(mod.VARIANTS)
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["state_mb"] > 0 and r["step_peak_mb"] is not None
    assert rows["official-style"]["speedup_vs_official"] == 1.0


def test_train_step_sequential_tiny(tmp_path):
    mod = load("bench_train_step")
    report = mod.main(["--models", "tiny", "--batch", "2", "--length", "8", "--sparsities", "0.9", "--n-examples",
                       "300", "--extra-keys", "64", "--reps", "1", "--warmup", "0", "--sequential", "yes",
                       "--variants", "official-style", "dense fine-tune", "--no-plot", "--output-dir", str(tmp_path)])
    rows = {r["variant"]: r for r in report.rows}
    assert set(rows) == {"official-style", "dense fine-tune"}
    assert all(r["timing"] == "sequential" and r["status"] == "ok" for r in rows.values())


def test_official_topk_and_capsparse_masks_agree_on_sparsity():
    mod = load("bench_train_step")
    model = mod.build_model("tiny")
    mod.make_official(model, 0.25)
    layer = model.bert.encoder.layer[0].intermediate.dense
    mask = mod.TopKBinarizer.apply(layer.mask_scores, 0.25)
    assert int(mask.sum()) == int(0.25 * mask.numel())
    step = mod.Step("capsparse unstructured", mod.build_model("tiny"), 0.75, 2, 8, 200, 128, "exact", 32)
    step.run()
    from capsparse import sparse_layers
    for _, layer in sparse_layers(step.model):
        assert abs(layer.sparsity - 0.75) < 0.01


def test_inference_tiny(tmp_path):
    mod = load("bench_inference")
    mod.main(["--models", "tiny", "--sparsities", "0.9", "--layouts", "block32", "unstructured", "--batches", "1",
              "--length", "16", "--reps", "1", "--warmup", "0", "--output-dir", str(tmp_path)])
    data = _read(tmp_path, "inference")
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "block32 90%", "unstructured 90%"}
    for r in rows.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0
    assert rows["block32 90%"]["file_mb"] < rows["dense"]["file_mb"]


def test_run_all_orchestrates_suites(tmp_path, monkeypatch):
    mod = load("run_all")
    seen = {}

    class Stub:
        def __init__(self, name):
            self.name = name

        def main(self, argv):
            seen[self.name] = argv
            if self.name == "banks":
                raise RuntimeError("boom")

    monkeypatch.setattr(mod, "load_suite", Stub)
    summary = mod.main(["--suites", "kernels", "banks", "--quick", "--reps", "1", "--output-dir", str(tmp_path)])
    assert summary["suites"]["kernels"]["status"] == "ok"
    assert summary["suites"]["banks"]["status"].startswith("failed: RuntimeError")
    assert "--quick" in seen["kernels"] and seen["kernels"][seen["kernels"].index("--reps") + 1] == "1"
    assert (tmp_path / "summary-quick.json").exists()


def test_bench_all_delegates_to_run_all(tmp_path, monkeypatch):
    run_all = load("run_all")
    monkeypatch.setitem(sys.modules, "run_all", run_all)
    seen = []
    monkeypatch.setattr(run_all, "load_suite", lambda name: type("S", (), {"main": staticmethod(seen.append)}))
    mod = load("bench_all")
    assert mod.main(["--suites", "banks", "--quick", "--output-dir", str(tmp_path)]) == 0
    assert seen and "--quick" in seen[0]


def test_every_suite_has_main_with_quick_and_output_dir(tmp_path):
    for name in ("kernels", "contrastive", "train_step", "inference", "banks", "all", "headline"):
        source = (BENCH / f"bench_{name}.py").read_text()
        assert "def main(argv=None)" in source
    H = load("_harness")
    args = H.base_parser("x").parse_args(["--quick", "--output-dir", str(tmp_path / "x")])
    assert args.quick and str(args.output_dir) == str(tmp_path / "x") and args.threads == 2


def test_headline_quick_every_section(tmp_path):
    mod = load("bench_headline")
    report = mod.main(["--quick", "--reps", "1", "--warmup", "0", "--malloc", "default", "--output-dir",
                       str(tmp_path)])
    data = _read(tmp_path, "headline-quick")
    rows = data["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    sections = {r["section"] for r in rows}
    assert sections == {"module", "summary", "train", "inference"}
    whats = {r["what"] for r in rows}
    assert any(w.startswith("kernel-level") for w in whats) and any("forward+backward" in w for w in whats)
    assert {r["what"].split(" vs ")[-1] for r in rows if r["section"] == "train"} == {"dense fine-tune",
                                                                                     "official-style"}
    assert any("unstructured" in r["what"] for r in rows if r["section"] == "inference")
    assert all(r["speedup"] > 0 for r in rows)
    from capsparse.backends import cpu
    # --malloc default changes nothing: the record is this process's state (another test may have set it)
    assert data["meta"]["allocator"] == cpu.allocator_state() and data["config"]["malloc"] == "default"
    assert report.name == "headline"


def test_headline_random_block_mask_is_exact():
    mod = load("bench_headline")
    m = mod.random_block_mask(96, 64, 32, 0.5, torch.Generator().manual_seed(0))
    assert m.shape == (3, 2) and int(m.sum()) == 3


def test_cap_step_profile_quick(tmp_path):
    mod = load("profile_cap_step")
    report = mod.main(["--quick", "--reps", "1", "--warmup", "0", "--output-dir", str(tmp_path), "--no-plot"])
    data = _read(tmp_path, "cap_step_profile-quick", png=False)
    rows = {(r["variant"], r["phase"]): r for r in data["rows"]}
    for variant in ("CAP block32, exact scores", "CAP block32, sampled scores"):
        for phase in mod.PHASES:
            assert rows[(variant, phase)]["median_ms"] > 0, (variant, phase)
        assert rows[(variant, "score gradient (in backward)")]["median_ms"] < rows[(variant, "backward")]["median_ms"]
    assert rows[("dense fine-tune", "score gradient (in backward)")]["median_ms"] == 0
    from capsparse.pruning import score_grad
    assert score_grad.MovementScoreFunction.backward.__name__ == "backward"  # the wrapper was removed
    assert "original" not in score_grad.MovementScoreFunction.backward.__code__.co_freevars
    assert report.name == "cap_step_profile"
