"""Shared timing harness for the capsparse benchmarks (``benchmarks/bench_*.py``).

Protocol (``docs/benchmarks.md``):

* ``torch.set_num_threads`` is pinned (default 2) before anything is timed;
* every case gets warm-up runs, then ``reps`` timed runs; we report the **median** with the **min**
  and **max** (wall clock), plus ``cpu_ms``, the median process CPU time per run (all threads; robust to
  preemption on a loaded machine, but it counts OpenMP spin-waiting and hides parallel speedup), and
  every speed figure is a **ratio against a baseline measured in the same run**;
* on CUDA the runs are timed with CUDA events and the L2 cache is flushed before each run (a
  256 MB buffer is zeroed, as ``triton.testing.do_bench`` does); on CPU ``time.perf_counter``;
* the machine (``lscpu`` model name), torch / transformers versions, git sha, thread count and date go
  into every JSON file;
* peak memory: ``torch.cuda.max_memory_allocated`` on GPU. On CPU the tensor allocator has no
  statistics, so we reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``) and read
  ``VmHWM`` after the run: the figure is the **peak resident set size above the RSS before the run**
  (glibc's ``malloc_trim(0)`` runs first so that the entry level is live data; the peak still
  reflects what the allocator reuses from its cache, so it is a lower bound of the step's transient
  memory; ``tracemalloc`` would not see torch tensors at all). Where the mark cannot be reset we fall
  back to the ``resource.getrusage`` ``ru_maxrss`` delta, which is only non-zero when the run sets a new process-wide peak; the method used is recorded per row.

Each result row is a plain dict. A case that cannot run here is kept as a row with
``status = "not available: <reason>"`` instead of failing the benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results"
OK = "ok"


def not_available(reason: str) -> str:
    return f"not available: {reason}"


# -- environment ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any failure means "not installed" here
        return "not installed"


def backend_availability() -> Dict[str, str]:
    """``{backend: "available" | "not available: <reason>"}`` for capsparse's backends."""
    try:
        from capsparse.backends.registry import available_backends
    except Exception as exc:  # noqa: BLE001
        return {"registry": not_available(f"capsparse.backends.registry: {exc}")}
    return {name: ("available" if ok else not_available(reason)) for name, (ok, reason) in
            available_backends().items()}


def cpu_kernels() -> str:
    """The vector code capsparse's C++ kernels were built with (AVX2 and AVX-512 machines give different ratios)."""
    try:
        from capsparse.backends import cpu
        ok, reason = cpu.is_available()
    except Exception as exc:  # noqa: BLE001
        return not_available(f"capsparse.backends.cpu: {exc}")
    return reason if ok else not_available(reason)


def _capsparse_path() -> str:
    """Which capsparse ran, without this machine's paths (results are committed): this checkout or an install."""
    try:
        import capsparse
        here = Path(capsparse.__file__).resolve().parent
    except Exception as exc:  # noqa: BLE001
        return f"not importable: {exc}"
    repo = Path(__file__).resolve().parents[1]
    return "<repo>/capsparse (this checkout)" if here == repo / "capsparse" else "installed package (not this checkout)"


def environment(device: str = "cpu") -> dict:
    """Everything needed to reproduce a figure."""
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "git_sha": git_sha(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
        "backends": backend_availability(),
        "cpu_kernels": cpu_kernels(),
        "capsparse_path": _capsparse_path(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    return info


def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)


def gpu_status() -> str:
    """``"ok"`` when a CUDA device is usable, else the reason."""
    if not torch.cuda.is_available():
        return "no GPU"
    return OK


# -- timing ---------------------------------------------------------------------------------------
_L2_FLUSH: Optional[torch.Tensor] = None


def flush_gpu_cache() -> None:
    """Evict the GPU L2 by writing a 256 MB buffer (``triton.testing.do_bench`` style)."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()


def measure(fn: Callable[[], object], warmup: int = 1, reps: int = 5, device: str = "cpu",
            flush_l2: bool = True, setup_fn: Optional[Callable[[], object]] = None) -> dict:
    """Times ``fn()``: ``warmup`` untimed calls, then ``reps`` timed calls.

    Returns ``{"median_ms", "min_ms", "max_ms", "reps", "times_ms"}``. ``setup_fn`` (untimed) runs before
    every call, e.g. to zero gradients. On CUDA the L2 is flushed before every timed call.
    """
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    cuda = str(device).startswith("cuda")
    for _ in range(max(0, warmup)):
        if setup_fn is not None:
            setup_fn()
        fn()
    if cuda:
        torch.cuda.synchronize()
    times, cpu_times = [], []
    for _ in range(reps):
        if setup_fn is not None:
            setup_fn()
        c0 = time.process_time()
        if cuda:
            if flush_l2:
                flush_gpu_cache()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "cpu_ms": statistics.median(cpu_times), "times_ms": [round(t, 4) for t in times]}


def measure_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 1, reps: int = 5, device: str = "cpu",
                        flush_l2: bool = True, setup_fns: Optional[Dict[str, Callable[[], object]]] = None
                        ) -> Dict[str, dict]:
    """Times several functions round-robin (rep 1 of each, then rep 2 of each, ...), so that load from
    other processes on a shared machine hits the baseline and the candidates alike. Same result format
    as :func:`measure`, one dict per name. A function that raises is reported as ``{"error": ...}``."""
    setup_fns = setup_fns or {}
    results: Dict[str, dict] = {}
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            for _ in range(max(0, warmup)):
                if name in setup_fns:
                    setup_fns[name]()
                fn()
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            del live[name]
    times: Dict[str, List[float]] = {name: [] for name in live}
    cpu: Dict[str, List[float]] = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            t = measure(fn, warmup=0, reps=1, device=device, flush_l2=flush_l2, setup_fn=setup_fns.get(name))
            times[name].append(t["median_ms"])
            cpu[name].append(t["cpu_ms"])
    for name, ts in times.items():
        results[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "reps": reps,
                         "cpu_ms": statistics.median(cpu[name]), "times_ms": [round(t, 4) for t in ts]}
    return results


def ratio(baseline_ms: Optional[float], ms: Optional[float]) -> Optional[float]:
    """Speedup of ``ms`` over ``baseline_ms`` (> 1: faster than the baseline)."""
    if baseline_ms is None or ms is None or ms <= 0 or (isinstance(ms, float) and math.isnan(ms)):
        return None
    return baseline_ms / ms


# -- memory ---------------------------------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_mb`` (peak above the level at entry) and
    ``pm.method`` (how it was measured, see the module docstring)."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.peak_mb: Optional[float] = None
        self.method = ""

    def __enter__(self):
        gc.collect()
        _malloc_trim()  # hand freed heap pages back, so the RSS at entry is live data, not allocator cache
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated delta"
        elif _reset_peak_rss() and _status_kb("VmHWM") is not None:
            self._base = _status_kb("VmRSS")
            self.method = "VmHWM delta (peak RSS reset via /proc/self/clear_refs)"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss delta (process-wide high-water mark; 0 unless a new peak)"
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2 ** 20
        elif self.method.startswith("VmHWM"):
            self.peak_mb = max(0, (_status_kb("VmHWM") or 0) - self._base) / 1024
        else:
            self.peak_mb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024
        return False


# -- reports --------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def _portable(path: Path) -> str:
    """A path as the written files may carry it: relative to the repository when inside it, else its last part
    (the results are committed and must not name a particular machine's directories)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return Path(path).name or "."


class Report:
    """Rows of one benchmark run plus the environment; written as CSV + JSON (+ PNG by the caller)."""

    def __init__(self, name: str, args: Optional[argparse.Namespace] = None, device: str = "cpu",
                 notes: Sequence[str] = ()):
        self.name = name
        self.quick = bool(getattr(args, "quick", False))
        self.config = {k: (_portable(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} if args else {}
        self.meta = environment(device)
        self.notes: List[str] = list(notes)
        self.rows: List[dict] = []

    @property
    def stem(self) -> str:
        return f"{self.name}-quick" if self.quick else self.name

    def add(self, **row) -> dict:
        row.setdefault("status", OK)
        self.rows.append(row)
        return row

    def na(self, reason: str, **row) -> dict:
        row["status"] = not_available(reason)
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            row.setdefault("status", OK)
            self.rows.append(row)

    def ok_rows(self) -> List[dict]:
        return [r for r in self.rows if r.get("status", OK) == OK]

    def columns(self) -> List[str]:
        cols: List[str] = []
        for row in self.rows:
            for key in row:
                if key not in cols and key != "times_ms":
                    cols.append(key)
        return cols

    def table(self, columns: Optional[Sequence[str]] = None) -> str:
        columns = list(columns) if columns else self.columns()
        body = [[_fmt(r.get(c)) for c in columns] for r in self.rows]
        widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
        return "\n".join(lines)

    def print(self, columns: Optional[Sequence[str]] = None, file=None) -> None:
        file = file or sys.stdout
        m = self.meta
        print(f"\n== {self.name}{' (quick)' if self.quick else ''} == {m['machine']}, {m['torch_threads']} threads, "
              f"torch {m['torch']}, transformers {m['transformers']}, git {m['git_sha']}, {m['date_utc']}",
              file=file)
        print(self.table(columns), file=file)
        for text in self.notes:
            print(f"note: {text}", file=file)

    def write(self, output_dir) -> Dict[str, Path]:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out / f"{self.stem}.csv", out / f"{self.stem}.json"
        columns = self.columns()
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({c: row.get(c, "") for c in columns})
        with open(json_path, "w") as fh:
            json.dump({"benchmark": self.name, "quick": self.quick, "meta": self.meta, "config": self.config,
                       "notes": self.notes, "rows": self.rows}, fh, indent=1, default=str)
        return {"csv": csv_path, "json": json_path}

    def png_path(self, output_dir) -> Path:
        return Path(output_dir) / f"{self.stem}.png"

    def subtitle(self) -> str:
        m = self.meta
        return (f"{m['machine']} ({m['device']}, {m['torch_threads']} threads), torch {m['torch']}, "
                f"git {m['git_sha']}, {m['date_utc'][:10]}{' [quick]' if self.quick else ''}")


def plt():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def save_figure(fig, report: Report, output_dir, top: float = 1.0) -> Path:
    path = report.png_path(output_dir)
    fig.text(0.01, 0.005, report.subtitle(), fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, top))
    fig.savefig(path, dpi=110)
    plt().close(fig)
    return path


# -- command line ---------------------------------------------------------------------------------
def base_parser(description: str, reps: int = 5, warmup: int = 1) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small configuration (see benchmarks/README.md for measured suite times)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="where CSV/JSON/PNG go (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default {reps}; fewer in --quick)")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up runs (default {warmup})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser


def resolve_device(args) -> str:
    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU in this session")
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def finish(report: Report, args, plot_fn: Optional[Callable] = None, columns: Optional[Sequence[str]] = None) -> dict:
    """Prints the table, writes CSV/JSON and (unless ``--no-plot``) the PNG; returns the paths."""
    for row in report.rows:
        row.setdefault("status", OK)
    report.print(columns)
    paths = report.write(args.output_dir)
    if plot_fn is not None and not args.no_plot and report.ok_rows():
        try:
            paths["png"] = plot_fn(report, args.output_dir)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the measurements
            report.note(f"plot failed: {exc}")
            paths.update(report.write(args.output_dir))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return {k: str(v) for k, v in paths.items()}


@contextlib.contextmanager
def no_grad_if(flag: bool):
    if flag:
        with torch.no_grad():
            yield
    else:
        yield


def chunks(seq: Iterable, n: int):
    buf = []
    for item in seq:
        buf.append(item)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
