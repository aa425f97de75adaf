"""Every option of the application layer: defaults, recipes and validation, in one place.

The CLI (``capsparse.cli``) parses flags into a plain dict; the commands (``capsparse.app.commands``) take the same
dict from Python. Both go through :func:`resolve`, so a flag and a Python option get the same defaults.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data.squad import is_squad_task
from ..runlog import get_logger

log = get_logger("app")


class OptionError(ValueError):
    """A user error in the options: printed by the CLI as one line, exit status 2."""


# defaults shared by the CLI and direct calls
DEFAULTS: Dict[str, Any] = dict(
    task="sst2", glue_dir=None, model="default", max_length=None, batch_size=None, eval_batch_size=64,
    max_train_examples=None, max_eval_examples=None, epochs=3.0, max_steps=None, learning_rate=None,
    warmup_ratio=None, logging_steps=None, eval_during_training=False, group_by_length=False, seed=42,
    output_dir=None, threads=None,
    teacher=None, method=None, cap=None, sparsity=None, block_size=None, recipe=None,
    cap_options=None, cap_option=None, split="validation", fp16=False,
    squad_dir=None, squad_train_file=None, squad_dev_file=None, doc_stride=128, max_query_length=64,
)

# task-dependent defaults (None above): GLUE as the official GLUE scripts, SQuAD as run_squad_*.sh
GLUE_MAX_LENGTH, GLUE_BATCH_SIZE = 128, 32
SQUAD_MAX_LENGTH, SQUAD_BATCH_SIZE = 384, 16
def default_recipe(task, method=None) -> str:
    """``glue-unstructured`` / ``squad-unstructured``, or ``*-structured`` for ``method="first-order"``."""
    kind = "structured" if method == "first-order" else "unstructured"
    return f"{'squad' if is_squad_task(task) else 'glue'}-{kind}"


def resolve(options: Optional[Dict[str, Any]], **overrides) -> Dict[str, Any]:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (options or {}).items()})
    out.update(overrides)
    if out.get("cap_options") is None and out.get("cap_option"):
        out["cap_options"] = parse_cap_options(out["cap_option"])
    squad = is_squad_task(out.get("task"))
    if out.get("max_length") is None:
        out["max_length"] = SQUAD_MAX_LENGTH if squad else GLUE_MAX_LENGTH
    if out.get("batch_size") is None:
        out["batch_size"] = SQUAD_BATCH_SIZE if squad else GLUE_BATCH_SIZE
    if out.get("recipe") is None:
        out["recipe"] = default_recipe(out.get("task"), out.get("method"))
    return out


def default_output_dir(command: str, task: Optional[str]) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{command}-{task or 'model'}-{stamp}")


def check_squad_options(o: Dict[str, Any]) -> None:
    if o.get("eval_during_training"):
        raise ValueError("--eval-during-training: not available for --task squad (exact match / F1 need the "
                         "answer post-processing); the dev set is evaluated at the end of the run")
    if not 0 <= int(o["doc_stride"]) < int(o["max_length"]):
        raise ValueError(f"--doc-stride: got {o['doc_stride']}, expected 0 <= doc stride < --max-length "
                         f"({o['max_length']})")


def build_cap_config(o: Dict[str, Any], has_teacher: bool):
    """CAPConfig from the recipe, then the explicit flags, then ``--cap-option`` values."""
    from ..cap.config import CAPConfig

    cfg = CAPConfig.recipe(o["recipe"])
    fields = {f.name for f in dataclasses.fields(cfg)}
    updates: Dict[str, Any] = {}
    if o.get("method") is not None:
        updates["method"] = o["method"]
    if o.get("cap") is not None:
        updates["use_cap"] = bool(o["cap"])
    if o.get("sparsity") is not None:
        updates["target_sparsity"] = float(o["sparsity"])
    if o.get("block_size") is not None:
        updates["block_size"] = int(o["block_size"])
    for key, value in (o.get("cap_options") or {}).items():
        if key not in fields:
            raise ValueError(f"--cap-option: unknown CAPConfig field {key!r}; known fields: "
                             f"{', '.join(sorted(fields))}")
        updates[key] = value
    unknown = [k for k in updates if k not in fields]
    if unknown:
        raise ValueError(f"CAPConfig has no field(s) {unknown}; known fields: {', '.join(sorted(fields))}")
    try:
        cfg = dataclasses.replace(cfg, **updates)
    except TypeError as exc:
        raise ValueError(f"--cap-option: {exc}") from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# Official GLUE run: w = 11000 steps of 113,710 (QQP, 10 epochs), i.e. about 0.1 of training.
SHORT_BUDGET_FRACTION = 0.1


def fit_schedule(cfg, total_steps: int, explicit: Dict[str, Any]):
    """Scale the cubic schedule to short budgets: when the recipe's unit in steps leaves no room to prune
    (``(i_w + f_w) * w >= total_steps``) and no schedule field was set explicitly, express ``w`` as
    the official fraction of training (0.1: dense warm-up 20%, pruning 50%, fixed masks 30% for GLUE)."""
    if getattr(cfg, "structured", False) or not hasattr(cfg, "schedule_unit"):
        return cfg
    if any(k in explicit for k in ("schedule_warmup", "schedule_unit", "initial_warmup", "final_warmup")):
        return cfg
    if cfg.schedule_unit == "steps" and (cfg.initial_warmup + cfg.final_warmup) * cfg.schedule_warmup >= total_steps:
        log.info("schedule: the recipe's %g-step unit does not fit %d steps; using %.2f of training as the unit "
                 "(same proportions as the official runs)", cfg.schedule_warmup, total_steps, SHORT_BUDGET_FRACTION)
        cfg = dataclasses.replace(cfg, schedule_unit="fraction", schedule_warmup=SHORT_BUDGET_FRACTION)
    return cfg


def check_squad_cap_config(cap_config) -> None:
    """SQuAD has no class labels and its models no pooler: refuse supervised positives / the pooler early."""
    if getattr(cap_config, "use_cap", False) and getattr(cap_config, "w_s", 0) > 0:
        raise ValueError(f"--task squad: w_s={cap_config.w_s} asks for supervised contrastive positives, which need "
                         f"class labels; use --recipe squad-unstructured / squad-structured (w_s=0) or "
                         f"--cap-option w_s=0")
    if getattr(cap_config, "use_cap", False) and getattr(cap_config, "representation", None) == "pooler":
        raise ValueError("--task squad: representation='pooler' needs a pooler, which QA models lack; use the "
                         "squad recipes (raw [CLS]) or --cap-option representation=cls")


def method_label(cap_config) -> str:
    """``CAP-m``, ``movement``, ``CAP-soft``, ``CAP-block``, ``CAP-f``... from a CAPConfig."""
    method = getattr(cap_config, "method", "movement")
    cap = bool(getattr(cap_config, "use_cap", False))
    if not cap:
        return method
    return {"movement": "CAP-m", "soft-movement": "CAP-soft", "block-movement": "CAP-block",
            "first-order": "CAP-f", "magnitude": "CAP-magnitude"}.get(method, f"CAP-{method}")


def parse_cap_options(items: Optional[List[str]]) -> Dict[str, Any]:
    """``["KEY=VALUE", ...]`` (``--cap-option``) as a dict; values parsed as JSON, else kept as strings."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if not isinstance(item, str) or "=" not in item:
            raise OptionError(f"--cap-option: got {item!r}, expected KEY=VALUE (e.g. temperature=0.1)")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise OptionError(f"--cap-option: got key {key!r}, expected a CAPConfig field name")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out
