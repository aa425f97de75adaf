"""Run directories: every ``capsparse`` run writes ``config.json``, ``metrics.json`` and ``run.log`` into its
``--output-dir`` (plus plots and model files written by the pipeline).

``config.json`` holds the resolved options and provenance (version, command line, machine, date);
``metrics.json`` is updated as results come in, so a partial run still leaves its numbers behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .distributed import is_main_process, shutdown_distributed, world_size  # noqa: F401 (re-exported)
from .distributed import rank as process_rank

PathLike = Union[str, "os.PathLike[str]"]
LOG_FILE = "run.log"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOGGER_NAME = "capsparse"


def _jsonable(value: Any) -> Any:
    """Best-effort conversion to JSON types (paths, tuples, numpy/torch scalars, dataclasses)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "to_dict") and callable(value.to_dict):
        try:
            return _jsonable(value.to_dict())
        except Exception:  # noqa: BLE001 - fall through to the generic paths
            pass
    if hasattr(value, "item") and callable(value.item):
        try:
            return _jsonable(value.item())
        except Exception:  # noqa: BLE001
            pass
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(value))
    return str(value)


def write_json(path: PathLike, data: Any) -> Path:
    """Atomic JSON write (a temp file then rename), so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text())


def cpu_model_name() -> str:
    """``lscpu``'s model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"cpu": cpu_model_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


class _TqdmSafeHandler(logging.StreamHandler):
    """Console handler that writes through ``tqdm.write`` so log lines do not break progress bars."""

    def emit(self, record):
        self.stream = sys.stderr  # follow redirections (pytest capture, tqdm) made after setup
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001
            super().emit(record)


def _is_console(handler) -> bool:
    return getattr(handler, "_capsparse", False) and not isinstance(handler, logging.FileHandler)


def setup_logging(output_dir: Optional[PathLike] = None, level: int = logging.INFO, console: bool = True,
                  log_file: str = LOG_FILE, sticky: bool = False) -> logging.Logger:
    """Configure the ``capsparse`` logger (console + ``<output_dir>/run.log``); also routes the
    ``transformers`` logger into the file. Calling it again replaces the previous run's file handlers,
    except ``sticky`` ones (an enclosing run, e.g. the demo's log, keeps receiving its sub-runs' lines)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    tf_logger = logging.getLogger("transformers")
    for lg in (logger, tf_logger):
        for handler in list(lg.handlers):
            if getattr(handler, "_capsparse", False) and not getattr(handler, "_capsparse_sticky", False) \
                    and not _is_console(handler):
                lg.removeHandler(handler)
                handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    if any(_is_console(h) for h in logger.handlers):
        console = False
    if console:
        stream = _TqdmSafeHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        stream.setLevel(level)
        stream._capsparse = True
        logger.addHandler(stream)
    if output_dir is not None:
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        for lg, lvl in ((logger, logging.DEBUG), (tf_logger, logging.INFO)):  # both into the same run.log
            handler = logging.FileHandler(path / log_file)
            handler.setFormatter(fmt)
            handler.setLevel(lvl)
            handler._capsparse = True
            handler._capsparse_sticky = sticky
            lg.addHandler(handler)
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


class RunDir:
    """A run's output directory: ``config.json`` (written once), ``metrics.json`` (merged updates), ``run.log``.

    Under ``torchrun`` only rank 0 writes them; the other ranks keep the metrics in memory and log warnings only.
    """

    def __init__(self, path: PathLike, command: Optional[str] = None, setup_log: bool = True, console: bool = True,
                 sticky: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self._metrics: Dict[str, Any] = {}
        if (self.path / METRICS_FILE).is_file():
            try:
                self._metrics = read_json(self.path / METRICS_FILE)
            except (OSError, ValueError):
                self._metrics = {}
        self.writes = is_main_process()
        if setup_log:
            if self.writes:
                setup_logging(self.path, console=console, sticky=sticky)
            else:
                setup_logging(None, level=logging.WARNING, console=console)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def write_config(self, options: Dict[str, Any], **extra: Any) -> Path:
        data = {"command": self.command, "options": options, "argv": sys.argv, "started": self.started.isoformat(),
                "capsparse_version": _version(), "machine": machine_info()}
        data.update(extra)
        if self.writes:
            write_json(self.config_path, data)
        return self.config_path

    def update_metrics(self, **metrics: Any) -> Dict[str, Any]:
        self._metrics.update(_jsonable(metrics))
        if self.writes:
            write_json(self.metrics_path, self._metrics)
        return self._metrics

    @property
    def metrics(self) -> Dict[str, Any]:
        return dict(self._metrics)

    def elapsed(self) -> float:
        return (_dt.datetime.now(_dt.timezone.utc) - self.started).total_seconds()


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"
