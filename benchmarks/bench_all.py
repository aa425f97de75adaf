"""``capsparse bench all``: every suite, through :mod:`run_all` (same options: ``--quick``, ``--suites`` ...).

    python benchmarks/bench_all.py --quick      # same as python benchmarks/run_all.py --quick
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_all  # noqa: E402


def main(argv=None):
    summary = run_all.main(argv)
    return 1 if any(not s["status"].startswith("ok") for s in summary["suites"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
