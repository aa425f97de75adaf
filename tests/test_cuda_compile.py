"""Compile checks for csrc/cuda (nvcc, no GPU needed) and the CPU-side contract of the cuda backend."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
SCRIPT = ROOT / ".ci" / "nvcc_check.sh"


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def test_sources_present():
    names = {p.name for p in CU_FILES}
    assert {"block_sparse_linear.cu", "block_metadata.cu", "cap_contrastive.cu"} <= names
    assert (ROOT / "csrc" / "cuda" / "binding_cuda.cpp").is_file()
    assert os.access(SCRIPT, os.X_OK), ".ci/nvcc_check.sh must be executable"


def test_cu_files_use_cuda_headers_only():
    allowed = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "mma.h", "stdint.h", "math.h", "common.cuh"}
    for path in list(CU_FILES) + list((ROOT / "csrc" / "cuda").glob("*.cuh")):
        for line in path.read_text().splitlines():
            if line.startswith("#include"):
                header = line.split()[1].strip('<>"')
                assert header in allowed, f"{path.name}: {line}"


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(cu):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    env = dict(os.environ, NVCC=nvcc)
    proc = subprocess.run(["bash", str(SCRIPT), str(cu)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("  ok    ") == 2, proc.stdout  # sm_80 and sm_90a


def test_nvcc_check_fails_on_warnings(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(int* p) { int unused_variable = 3; p[0] = 1; }\n")
    proc = subprocess.run(["bash", str(SCRIPT), str(bad)], capture_output=True, text=True,
                          env=dict(os.environ, NVCC=nvcc, NVCC_CHECK_ARCHS="sm_80"), timeout=120)
    assert proc.returncode != 0, proc.stdout


def test_nvcc_check_skips_without_nvcc():
    env = dict(os.environ, NVCC="/nonexistent/bin/nvcc")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIPPED (nvcc not found" in proc.stdout


def test_cuda_backend_is_available_does_not_raise():
    """CPU-runnable: the backend imports without the extension and reports why it is unavailable."""
    import torch

    from capsparse.backends import cuda as cuda_backend

    assert "capsparse._C_cuda" not in sys.modules or torch.cuda.is_available()
    ok, reason = cuda_backend.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert cuda_backend.VERIFIED_ON_GPU is False
    if not torch.cuda.is_available():
        assert (ok, reason) == (False, "no CUDA device")
    elif not ok:
        assert reason == "capsparse._C_cuda not built (needs a CUDA build of torch)"
