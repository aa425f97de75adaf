"""GPU acceptance check: does capsparse's GPU path work on this machine, and how fast is it?

    python scripts/gpu_check.py OUT_DIR            # run every step, write OUT_DIR/gpu_check.{json,md}
    python scripts/gpu_check.py OUT_DIR --dry-run  # list the steps and their timeouts, run nothing

Needs no network: it installs from this checkout with ``pip install --no-deps --no-build-isolation
-e .`` (a failing CUDA extension build only loses the ``cuda`` backend; setup.py goes on) and goes on
whatever a step returns. Each step runs as a subprocess under its own timeout; its exit code, time
and output tail are recorded, and both summaries are rewritten after every step, so a crash or a
timeout keeps what was done. Steps: environment (GPU, driver, torch, triton, nvcc, git sha), install,
the GPU tests (Triton and CUDA backends and the public ops on CUDA), a few CAP training steps of a tiny
model on CUDA, compute-sanitizer memcheck on a few CUDA-backend tests, and the kernel benchmarks
(fp32 and bf16, 90% and 97% block sparsity, BERT-base FFN shapes at T=8192; the CAP contrastive loss
at batch 32 against 4160 and 16384 keys, D=768). Budget: about 8 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

ENV_SNIPPET = r"""
import json, subprocess, torch
out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
try:
    import triton; out["triton"] = triton.__version__
except ImportError as e:
    out["triton"] = f"not importable: {e}"
if torch.cuda.is_available():
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["capability"] = list(torch.cuda.get_device_capability(0))
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"unavailable: {e}"
out["driver"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
out["nvcc"] = (run(["nvcc", "--version"]).splitlines() or [""])[-1]
out["git_sha"] = run(["git", "rev-parse", "HEAD"])
out["git_dirty"] = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]))
try:
    from capsparse.backends import available_backends
    out["backends"] = {k: list(v) for k, v in available_backends().items()}
except Exception as e:  # not installed yet: the install step follows
    out["backends"] = f"capsparse not importable: {e}"
print(json.dumps(out))
"""

CAP_STEPS_SNIPPET = r"""
import json, sys, tempfile, time, torch
sys.path.insert(0, "tests")
from _tiny import tiny_args, tiny_bert, tiny_cap_config, tiny_dataset
from capsparse.cap.trainer import CAPTrainer
from capsparse.surgery import sparse_layers
results = {}
for method, extra in (("movement", {}), ("block-movement", {"block_size": 32})):
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = tiny_cap_config(method=method, target_sparsity=0.875, w_s=10.0, **extra)  # 2 of 16 blocks kept
        model = tiny_bert(hidden=128, intermediate=256)
        args = tiny_args(tmp, max_steps=8, use_cpu=False, bf16=True, logging_steps=2)
        start = time.time()
        trainer = CAPTrainer(model, args, cfg, tiny_dataset(64), teacher=tiny_bert(seed=1, hidden=128, intermediate=256))
        trainer.train()
        losses = [l["loss"] for l in trainer.state.log_history if "loss" in l]
        layer = sparse_layers(trainer.model)[0][1]
        results[method] = dict(seconds=round(time.time() - start, 2), device=str(layer.weight.device),
                               losses=losses, finite=all(l == l and abs(l) < 1e9 for l in losses))
        assert layer.weight.device.type == "cuda", layer.weight.device
        assert results[method]["finite"], losses
print(json.dumps(results))
"""

BENCH_SNIPPET = r"""
import json, torch, triton.testing as tt
import torch.nn.functional as F
from capsparse.layout import BlockLayout
from capsparse.ops import block_sparse_linear, cap_contrastive_loss
torch.manual_seed(0)
dev, rows = "cuda", []
def bench(fn):
    return tt.do_bench(fn, warmup=10, rep=40)  # ms, median; flushes L2 between reps
for dtype in (torch.float32, torch.bfloat16):
    for sparsity in (0.9, 0.97):
        for n, k in ((3072, 768), (768, 3072)):  # BERT-base FFN up / down
            T, b = 8192, 64
            bitmap = torch.rand(n // b, k // b, device=dev) >= sparsity
            layout = BlockLayout.from_bitmap(bitmap, (n, k), (b, b))
            x = torch.randn(T, k, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
            gy = torch.randn(T, n, device=dev, dtype=dtype)
            dense_f = bench(lambda: F.linear(x, w))
            sparse_f = bench(lambda: block_sparse_linear(x, w, layout, backend="triton"))
            def dense_fb():
                F.linear(x, w).backward(gy)
            def sparse_fb():
                block_sparse_linear(x, w, layout, backend="triton").backward(gy)
            dfb, sfb = bench(dense_fb), bench(sparse_fb)
            rows.append(dict(op="block_sparse_linear", dtype=str(dtype).split(".")[-1], sparsity=sparsity,
                             shape=f"T{T} {k}->{n} b{b}", dense_fwd_ms=dense_f, sparse_fwd_ms=sparse_f,
                             fwd_speedup=dense_f / sparse_f, dense_fwd_bwd_ms=dfb, sparse_fwd_bwd_ms=sfb,
                             fwd_bwd_speedup=dfb / sfb))
for nk in (4160, 16384):
    B, D = 32, 768
    q = torch.randn(B, D, device=dev, requires_grad=True)
    kb = torch.randn(nk, D, device=dev)
    qid, kid = torch.randint(0, 500, (B,), device=dev), torch.randint(0, 500, (nk,), device=dev)
    ql, kl = torch.randint(0, 3, (B,), device=dev), torch.randint(0, 3, (nk,), device=dev)
    def run(backend):
        lu, ls = cap_contrastive_loss(q, kb, qid, kid, ql, kl, backend=backend)
        (lu + ls).backward()
    ref, fused = bench(lambda: run("reference")), bench(lambda: run("triton"))
    rows.append(dict(op="cap_contrastive_loss fwd+bwd", dtype="float32", shape=f"B{B} K{nk} D{D} labels",
                     reference_ms=ref, triton_ms=fused, speedup=ref / fused))
print(json.dumps(rows))
"""

GPU_TESTS = ["tests/test_triton_kernels.py", "tests/test_ops_triton.py", "tests/test_cuda_backend.py",
             "tests/test_cuda_compile.py"]
SANITIZED = "tests/test_cuda_backend.py"


def steps(out_dir):
    """``(name, argv, timeout_s, parse_json)``, in order."""
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    return [
        ("environment", [PY, "-c", ENV_SNIPPET], 60, True),
        ("install", [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], 240, False),
        ("environment_after_install", [PY, "-c", ENV_SNIPPET], 60, True),
        ("gpu_tests", pytest + GPU_TESTS + [f"--junitxml={os.path.join(out_dir, 'gpu_tests.xml')}"], 180, False),
        ("cap_training_steps", [PY, "-c", CAP_STEPS_SNIPPET], 90, True),
        ("compute_sanitizer_memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"]
         + pytest + [SANITIZED, "-k", "bsl_forward and 64 or cap_contrastive and official"], 120, False),
        ("benchmarks", [PY, "-c", BENCH_SNIPPET], 120, True),
    ]


def _run(argv, timeout):
    start = time.time()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the GPU, not the interpreter
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")) \
            + ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
    except FileNotFoundError as exc:
        rc, out = "not found", str(exc)
    return rc, round(time.time() - start, 1), out


def _markdown(report):
    lines = ["# capsparse GPU check", "", f"started {report['started']}", ""]
    env = next((s.get("result") for s in report["steps"] if s["name"].startswith("environment") and s.get("result")),
               None)
    if env:
        for key in ("gpus", "driver", "torch", "torch_cuda", "triton", "nvcc", "git_sha", "git_dirty"):
            lines.append(f"- {key}: {env.get(key)}")
        lines.append("")
    lines += ["| step | status | seconds |", "|---|---|---|"]
    for s in report["steps"]:
        status = "ok" if s["rc"] == 0 else f"FAILED ({s['rc']})"
        lines.append(f"| {s['name']} | {status} | {s['seconds']} |")
    bench = next((s.get("result") for s in report["steps"] if s["name"] == "benchmarks" and s.get("result")), None)
    if bench:
        lines += ["", "## Benchmarks (ms, triton.testing.do_bench median)", ""]
        for row in bench:
            lines.append("- " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items()))
    for s in report["steps"]:
        if s["rc"] != 0:
            lines += ["", f"## {s['name']}: output tail", "", "```", s["output_tail"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and timeouts, run nothing")
    args = parser.parse_args(argv)
    plan = steps(os.path.abspath(args.out_dir))
    if args.dry_run:
        for name, cmd, timeout, _ in plan:
            shown = " ".join(c if len(c) < 80 else "<inline python>" for c in cmd)
            print(f"{name:28} timeout {timeout:4d} s  {shown}")
        print(f"total timeout budget: {sum(p[2] for p in plan)} s")
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": []}
    for name, cmd, timeout, parse in plan:
        print(f"[gpu_check] {name} ...", flush=True)
        rc, seconds, out = _run(cmd, timeout)
        step = {"name": name, "rc": rc, "seconds": seconds, "output_tail": out[-12000:]}
        if parse and rc == 0:
            try:
                step["result"] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                step["result"] = None
        report["steps"].append(step)
        with open(os.path.join(args.out_dir, "gpu_check.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out_dir, "gpu_check.md"), "w", encoding="utf-8") as f:
            f.write(_markdown(report))
        print(f"[gpu_check] {name}: rc={rc} in {seconds} s", flush=True)
    failed = [s["name"] for s in report["steps"] if s["rc"] != 0]
    print(f"[gpu_check] done; failed steps: {failed or 'none'}; summary in {args.out_dir}/gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
