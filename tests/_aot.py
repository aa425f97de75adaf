"""Compile every Triton kernel ahead of time for sm_90 / sm_80 with the launchers' GPU configs; no GPU.

Run as a script (``python tests/_aot.py [--arch 90 80] [--json]``): it must run in a process where
``TRITON_INTERPRET`` is unset (under the interpreter ``@triton.jit`` gives interpreter functions that
cannot be compiled), which is why tests/test_triton_aot.py starts it as a subprocess. Triton's
NVIDIA backend and its bundled ptxas compile the kernels; the bundled ``cuobjdump`` reads registers
and the stack frame (spills) from the cubin. Triton caches compiled kernels (``~/.triton/cache``),
so repeated runs are fast.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# shared memory per block (opt-in maximum), bytes
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, constexprs, types):
    return {a: ("constexpr" if a in constexprs else types(a)) for a in fn.arg_names}


# the default set of tests/test_triton_aot.py: the default block size (64) of every op in both dtypes,
# the largest block (128) where its configs differ, and the contrastive kernels at CAP's shape
REPRESENTATIVE = (
    "bsl_fwd bf16 b64 d0.5", "bsl_dx bf16 b64 d0.5", "bsl_dw bf16 b64 d0.5", "bsl_fwd fp32 b64 d0.5",
    "bsl_dw fp32 b64 d0.03", "bsl_fwd bf16 b128 d0.5", "bsl_dw fp32 b128 d0.03",
    "cap_fwd fp32 B32 K16384 D768 labels", "cap_dq fp32 B32 K16384 D768 labels",
)


def cases(full: bool = True):
    """``(label, fn, signature, constexprs, options)`` for the configs the launchers pick on an H100."""
    from capsparse.kernels import block_sparse as bs
    from capsparse.kernels import contrastive as cc
    from capsparse.kernels._common import table_config

    gpu = "NVIDIA H100 80GB HBM3"
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        act = _PTR[dtype]
        for block in (32, 64, 128):
            for op, fn, extra in (("fwd", bs._bsl_fwd_kernel, dict(has_bias=True)),
                                  ("dx", bs._bsl_dx_kernel, {}),
                                  ("dw", bs._bsl_dw_kernel, {})):
                for density in ((0.03, 0.5) if op == "dw" else (0.5,)):
                    meta, options = bs.launch_meta(op, block, block, dtype, table_config(gpu, op, block, density, dtype),
                                                   **extra)
                    if op == "dw":
                        meta["MODE"] = 1  # split-K into the fp32 workspace, the common case

                    def types(a, _act=act, _op=op):
                        if a in ("out_ptr",):
                            return "*fp32"
                        if a.endswith("_ptr"):
                            return "*i64" if a == "nnz_ptr" else ("*i32" if "row" in a or "col" in a else _act)
                        return "i32"
                    label = f"bsl_{op} {_NAME[dtype]} b{block} d{density}"
                    out.append((label, fn, _signature(fn, meta, types), meta, options))
        for kind, fn in (("fwd", cc._cap_fwd_kernel), ("dq", cc._cap_bwd_dq_kernel)):
            for B, NK, D in ((32, 16384, 768), (2048, 4160, 768)):
                cfg = cc.contrastive_config(kind, torch.device("cuda"), B, NK, D, gpu=True)
                meta, options = cc.contrastive_meta(kind, cfg, dtype, has_labels=True, num_out=2)

                def types(a, _act=act):
                    if a in ("q_ptr", "k_ptr"):
                        return _act
                    if a in ("qid_ptr", "kid_ptr", "qlab_ptr", "klab_ptr", "excl_ptr"):
                        return "*i64"
                    if a.endswith("_ptr"):
                        return "*fp32"
                    return "fp32" if a == "inv_tau" else "i32"
                label = f"cap_{kind} {_NAME[dtype]} B{B} K{NK} D{D} labels"
                out.append((label, fn, _signature(fn, meta, types), meta, options))
    return out if full else [c for c in out if c[0] in REPRESENTATIVE]


def _resources(cubin: bytes):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(m.group(1)), int(m.group(2))


def compile_all(archs=(90, 80), full=True):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: kernels are interpreter functions and cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for label, fn, sig, meta, options in cases(full):
        for arch in archs:
            k = triton.compile(ASTSource(fn, sig, meta), target=GPUTarget("cuda", arch, 32), options=options)
            regs, stack = _resources(k.asm["cubin"])
            rows.append(dict(kernel=label, arch=f"sm_{arch}", shared=int(k.metadata.shared), regs=regs,
                             spill=stack, smem_limit=SMEM_LIMIT[arch], num_warps=options["num_warps"],
                             num_stages=options["num_stages"]))
    return rows


def table(rows):
    lines = [f"{'kernel':44} {'arch':6} {'warps':>5} {'stages':>6} {'shared B':>9} {'regs':>5} {'spill B':>8}"]
    for r in rows:
        lines.append(f"{r['kernel']:44} {r['arch']:6} {r['num_warps']:>5} {r['num_stages']:>6} {r['shared']:>9} "
                     f"{r['regs']:>5} {r['spill']:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for the test)")
    parser.add_argument("--representative", action="store_true", help="only the REPRESENTATIVE configs")
    args = parser.parse_args()
    result = compile_all(tuple(args.arch), full=not args.representative)
    print(json.dumps(result) if args.json else table(result))
    sys.exit(0)
