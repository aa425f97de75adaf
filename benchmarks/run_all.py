"""Runs every capsparse benchmark suite in one process and writes a summary.

    python benchmarks/run_all.py --quick                  # whole suite in quick mode (BERT-base train step only in full mode)
    python benchmarks/run_all.py                          # full mode of every suite (about an hour on 2 cores)
    python benchmarks/run_all.py --suites kernels banks   # a subset

Options other than ``--suites`` are passed to every suite (``--quick``, ``--output-dir``, ``--threads``,
``--reps``, ``--warmup``, ``--device``, ``--no-plot``). A suite that fails is reported in the summary and
the others still run. ``bench_kernels_cpu`` (the C++ kernel sweep, another page) runs only when named.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

HERE = Path(__file__).resolve().parent
SUITES = ("kernels", "contrastive", "train_step", "inference", "banks")
OPTIONAL = ("kernels_cpu",)


def load_suite(name: str):
    path = HERE / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"capsparse_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="*", default=list(SUITES), choices=list(SUITES + OPTIONAL))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=H.DEFAULT_OUTPUT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    passthrough = ["--output-dir", str(args.output_dir), "--threads", str(args.threads)]
    if args.quick:
        passthrough.append("--quick")
    for flag in ("reps", "warmup", "device"):
        if getattr(args, flag) is not None:
            passthrough += [f"--{flag}", str(getattr(args, flag))]
    if args.no_plot:
        passthrough.append("--no-plot")
    summary = {"meta": H.environment(args.device or "cpu"), "quick": args.quick, "suites": {}}
    t_all = time.perf_counter()
    for name in args.suites:
        t0 = time.perf_counter()
        try:
            module = load_suite(name)
            suite_argv = list(passthrough)
            if name == "kernels_cpu":  # the C++ sweep has its own options (--repeats, no --reps/--device)
                suite_argv = ["--output-dir", str(args.output_dir), "--threads", str(args.threads)]
                suite_argv += ["--quick"] if args.quick else []
                suite_argv += ["--no-plot"] if args.no_plot else []
            module.main(suite_argv)
            status = "ok"
        except SystemExit as exc:  # argparse errors inside a suite
            status = f"failed: SystemExit {exc.code}"
        except Exception as exc:  # noqa: BLE001 - keep running the other suites
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {exc}"
        summary["suites"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[run_all] {name}: {status} ({summary['suites'][name]['seconds']} s)", flush=True)
    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / ("summary-quick.json" if args.quick else "summary.json")
    path.write_text(json.dumps(summary, indent=1))
    print(f"[run_all] total {summary['total_seconds']} s; wrote {path}")
    return summary


if __name__ == "__main__":
    main()
