"""Every Triton kernel compiled ahead of time for sm_90 and sm_80 with the launchers' GPU configs (no GPU).

Fails when a config needs more shared memory than the architecture has or when ptxas spills more
than ``SPILL_BOUND`` bytes per thread; prints the table (``pytest -s``). By default it compiles a
representative set (tests/_aot.py ``REPRESENTATIVE``: block 64 for every op and dtype, block 128 where
its configs differ, the contrastive kernels at CAP's shape): 34 s with an empty Triton cache on 2 shared cores;
``CAPSPARSE_AOT_FULL=1`` compiles every config (32 kernels per arch). Triton's cache makes reruns fast.
"""
import json
import os
import subprocess
import sys

import pytest

SPILL_BOUND = 16  # bytes of stack (spill) per thread; today: 0 everywhere but fp32 128-block fwd on sm_80 (8 B)
HERE = os.path.dirname(os.path.abspath(__file__))


def _nvidia_backend_missing():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"Triton's NVIDIA backend cannot be imported: {exc}"
    return None


@pytest.mark.skipif(_nvidia_backend_missing() is not None, reason=str(_nvidia_backend_missing()))
def test_kernels_compile_for_sm90_and_sm80_without_spills():
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreter functions
    argv = [sys.executable, os.path.join(HERE, "_aot.py"), "--json", "--arch", "90", "80"]
    if os.environ.get("CAPSPARSE_AOT_FULL") != "1":
        argv.append("--representative")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    sys.path.insert(0, HERE)
    from _aot import table

    print("\n" + table(rows))
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"} and len(rows) >= 18
    too_big = [f"{r['kernel']} {r['arch']}: {r['shared']} B > {r['smem_limit']} B" for r in rows
               if r["shared"] > r["smem_limit"]]
    spills = [f"{r['kernel']} {r['arch']}: {r['spill']} B/thread" for r in rows if r["spill"] > SPILL_BOUND]
    assert not too_big, f"shared memory over the limit: {too_big}"
    assert not spills, f"register spills over {SPILL_BOUND} B/thread: {spills}"
