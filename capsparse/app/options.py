"""Every option of the application layer: defaults, recipes and validation, in one place.

The CLI (``capsparse.cli``) parses flags into a plain dict; the commands (``capsparse.app.commands``) take the same
dict from Python. Both go through :func:`resolve`, which validates every option once (an :class:`OptionError`
naming the flag, the value and what was expected), refuses conflicting options, and fills the defaults: the task's
(sequence length, batch size) and, for ``prune``, the recipe's (method, sparsity, learning rate, batch size,
weight decay; the recipes are :data:`capsparse.cap.config.RECIPES` / ``RECIPE_TRAINING``). ``resolve`` has no side
effects and is idempotent: resolving resolved options changes nothing.

Words: *sparsity* is the fraction of encoder-linear weights removed (``--sparsity 0.9``); the kept fraction is
*density* (``1 - sparsity``); *threshold* means only soft movement's sigmoid cut-off.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..cap.config import METHODS, RECIPE_TRAINING, RECIPES, CAPConfig
from ..data.squad import is_squad_task
from ..layout import SUPPORTED_BLOCK_SIZES as BLOCK_SIZES
from ..export import META_FILE
from ..runlog import CONFIG_FILE, get_logger

log = get_logger("app")

RECIPE_NAMES = tuple(RECIPES)
#: commands that train, write a run directory, and so take --save-steps / --resume / --overwrite
TRAINING_COMMANDS = ("finetune", "prune")


class OptionError(ValueError):
    """A user error in the options: printed by the CLI as one line, exit status 2."""


# defaults shared by the CLI and direct calls; None: filled by resolve() from the task or the recipe
DEFAULTS: Dict[str, Any] = dict(
    task="sst2", glue_dir=None, model="default", max_length=None, batch_size=None, eval_batch_size=64,
    max_train_examples=None, max_eval_examples=None, epochs=3.0, max_steps=None, learning_rate=None,
    weight_decay=None, warmup_ratio=None, logging_steps=None, eval_during_training=False, group_by_length=False,
    seed=42, output_dir=None, threads=None, save_steps=None, resume=False, overwrite=False,
    teacher=None, prc_model=None, method=None, cap=None, sparsity=None, block_size=None, recipe=None, official=False,
    cap_options=None, cap_option=None, split="validation", fp16=False,
    squad_dir=None, squad_train_file=None, squad_dev_file=None, doc_stride=128, max_query_length=64,
)

# task-dependent defaults: GLUE as the official GLUE scripts, SQuAD as run_squad_*.sh
GLUE_MAX_LENGTH, GLUE_BATCH_SIZE = 128, 32
SQUAD_MAX_LENGTH, SQUAD_BATCH_SIZE = 384, 16
FINETUNE_LEARNING_RATE = 5e-5
# Official GLUE run: w = 11000 steps of 113,710 (QQP, 10 epochs), i.e. about 0.1 of training.
SHORT_BUDGET_FRACTION = 0.1
#: ``capsparse demo``: SST-2 at a short sequence length, one learning rate for the teacher and both students, and
#: its budget as (full run, --quick)
DEMO_MAX_LENGTH, DEMO_SPARSITY, DEMO_LEARNING_RATE = 64, 0.9, 1e-4
DEMO_BUDGET = {"train_examples": (4000, 256), "teacher_steps": (300, 8), "prune_steps": (300, 12),
               "max_eval_examples": (None, 128)}
#: where the demo's students start: the briefly fine-tuned teacher, or the pre-trained model (as the paper)
STUDENT_INITS = ("teacher", "pretrained")
DEMO_DEFAULTS: Dict[str, Any] = dict(quick=False, student_init="teacher", train_examples=None, teacher_steps=None,
                                     prune_steps=None)
#: CAPConfig fields that have their own flag: ``--cap-option`` may repeat the flag's value, never contradict it
FLAG_FIELDS = {"method": "method", "target_sparsity": "sparsity", "block_size": "block_size", "use_cap": "cap"}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _need(cond: bool, dest: str, value: Any, expected: str) -> None:
    if not cond:
        raise OptionError(f"{flag(dest)}: got {value!r}, expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def default_recipe(task, method=None) -> str:
    """``glue-unstructured`` / ``squad-unstructured``, or ``*-structured`` for ``method="first-order"``."""
    kind = "structured" if method == "first-order" else "unstructured"
    return f"{'squad' if is_squad_task(task) else 'glue'}-{kind}"


def default_output_dir(command: str, task: Optional[str]) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{command}-{task or 'model'}-{stamp}")


# -- resolve ---------------------------------------------------------------------------------------------------

def resolve(options: Optional[Dict[str, Any]] = None, command: Optional[str] = None, **overrides) -> Dict[str, Any]:
    """The options of ``command`` (default: ``options["command"]``) merged over :data:`DEFAULTS`, validated,
    with the task's and the recipe's defaults filled in. Raises :class:`OptionError`."""
    command = command or overrides.get("command") or (options or {}).get("command")
    o = dict(DEFAULTS, **(DEMO_DEFAULTS if command == "demo" else {}))
    o.update(options or {})
    o.update(overrides)
    o["command"] = command
    if command == "prune":
        _take_cap_options(o)
    validate(o, command)
    squad = is_squad_task(o.get("task"))
    if command == "demo":
        _apply_demo(o)
    if o.get("max_length") is None:
        o["max_length"] = SQUAD_MAX_LENGTH if squad else GLUE_MAX_LENGTH
    if command == "prune":
        _apply_recipe(o)
        # every CAPConfig value checked before any work starts; its block side is CAPConfig's (block-movement: 32)
        o["block_size"] = build_cap_config(o).block_size
    elif command == "finetune":
        if o.get("learning_rate") is None:
            o["learning_rate"] = FINETUNE_LEARNING_RATE
        if o.get("weight_decay") is None:
            o["weight_decay"] = 0.0
    if o.get("batch_size") is None:
        o["batch_size"] = SQUAD_BATCH_SIZE if squad else GLUE_BATCH_SIZE
    return o


def _apply_demo(o: Dict[str, Any]) -> None:
    quick = bool(o.get("quick"))
    for dest, (full, short) in DEMO_BUDGET.items():
        if o.get(dest) is None:
            o[dest] = short if quick else full
    for dest, value in (("max_length", DEMO_MAX_LENGTH), ("sparsity", DEMO_SPARSITY),
                        ("learning_rate", DEMO_LEARNING_RATE)):
        if o.get(dest) is None:
            o[dest] = value


def _take_cap_options(o: Dict[str, Any]) -> None:
    """``--cap-option`` strings (and a ``cap_options`` dict) -> one typed dict; fields that have a flag move to it."""
    values = dict(o.get("cap_options") or {})
    values.update(parse_cap_options(o.get("cap_option")))
    values = coerce_cap_options(values)
    for field, dest in FLAG_FIELDS.items():
        if field not in values:
            continue
        value = values.pop(field)
        if o.get(dest) is not None and o[dest] != value:
            raise OptionError(f"--cap-option: got {field}={value!r} with {flag(dest)} {o[dest]!r}, expected one "
                              f"value: give it once, as {flag(dest)}")
        o[dest] = value
    o["cap_options"], o["cap_option"] = values, None


def _apply_recipe(o: Dict[str, Any]) -> None:
    """prune: the recipe (given, or the task's and method's default) fills every option left unset."""
    method, recipe = o.get("method"), o.get("recipe")
    if recipe is None:
        recipe = o["recipe"] = default_recipe(o.get("task"), method)
    structured = recipe.endswith("-structured")
    if method is not None and (method == "first-order") != structured:
        want = "a *-structured recipe" if method == "first-order" else "a *-unstructured recipe"
        raise OptionError(f"--recipe: got {recipe!r} with --method {method}, expected {want} (or no --recipe: "
                          f"{default_recipe(o.get('task'), method)!r} is the default)")
    values, training = RECIPES[recipe], RECIPE_TRAINING[recipe]
    if method is None:
        method = o["method"] = values["method"]
    if method == "soft-movement" and o.get("sparsity") is not None:
        raise OptionError(f"--sparsity: got {o['sparsity']!r} with --method soft-movement, expected no --sparsity: "
                          f"soft movement has no target; its L1 penalty sets the sparsity it reaches (tune "
                          f"--cap-option soft_lambda_final=..., soft_final_threshold=...)")
    if o.get("sparsity") is None and method != "soft-movement":
        o["sparsity"] = values["target_sparsity"]
    if o.get("cap") is None:
        o["cap"] = True
    if o.get("learning_rate") is None:
        o["learning_rate"] = training["learning_rate"]
    if o.get("batch_size") is None:
        o["batch_size"] = training["per_device_train_batch_size"]
    if o.get("weight_decay") is None:
        o["weight_decay"] = training["weight_decay"]
    if o.get("warmup_ratio") is None and not structured:
        o["warmup_ratio"] = SHORT_BUDGET_FRACTION  # the official LR warm-up is the schedule unit w


# -- the defaults resolve() computes, as the help shows them --------------------------------------------------------

#: a case of a computed default: ``(when, options, value)``; ``when`` is "" for the plain case
DefaultCase = Tuple[str, Dict[str, Any], Any]


def _recipe_cases(value_of) -> List[DefaultCase]:
    return [(name, {"recipe": name, "task": "squad" if name.startswith("squad") else "sst2"}, value_of(name))
            for name in RECIPE_NAMES]


def computed_defaults(command: str) -> Dict[str, List[DefaultCase]]:
    """The options of ``command`` whose default :func:`resolve` fills from the task, the recipe or ``--quick``,
    each with the cases the help names. The CLI prints them (:func:`describe_default`); the tests resolve each
    case and compare, so the help cannot drift from what runs."""
    task_cases = lambda glue, squad: [("", {}, glue), ("--task squad", {"task": "squad"}, squad)]  # noqa: E731
    out: Dict[str, List[DefaultCase]] = {}
    if command in ("finetune", "prune", "eval"):
        out["max_length"] = task_cases(GLUE_MAX_LENGTH, SQUAD_MAX_LENGTH)
    if command == "finetune":
        out["batch_size"] = task_cases(GLUE_BATCH_SIZE, SQUAD_BATCH_SIZE)
    if command == "finetune":
        out["learning_rate"] = [("", {}, FINETUNE_LEARNING_RATE)]
        out["weight_decay"] = [("", {}, 0.0)]
        out["warmup_ratio"] = [("", {}, None)]
    if command == "prune":
        out["recipe"] = [("", {}, default_recipe("sst2")), ("--task squad", {"task": "squad"}, default_recipe("squad")),
                         ("--method first-order", {"method": "first-order"}, default_recipe("sst2", "first-order")),
                         ("--task squad --method first-order", {"task": "squad", "method": "first-order"},
                          default_recipe("squad", "first-order"))]
        out["method"] = _recipe_cases(lambda r: RECIPES[r]["method"])
        out["sparsity"] = _recipe_cases(lambda r: RECIPES[r]["target_sparsity"])
        out["block_size"] = [("--method block-movement", {"method": "block-movement"},
                              CAPConfig(method="block-movement").block_size), ("other methods", {}, None)]
        out["batch_size"] = _recipe_cases(lambda r: RECIPE_TRAINING[r]["per_device_train_batch_size"])
        out["learning_rate"] = _recipe_cases(lambda r: RECIPE_TRAINING[r]["learning_rate"])
        out["weight_decay"] = _recipe_cases(lambda r: RECIPE_TRAINING[r]["weight_decay"])
        out["warmup_ratio"] = _recipe_cases(lambda r: None if r.endswith("-structured") else SHORT_BUDGET_FRACTION)
    if command == "demo":
        out["max_length"] = [("", {}, DEMO_MAX_LENGTH)]
        out["batch_size"] = [("", {}, GLUE_BATCH_SIZE)]
        out["sparsity"] = [("", {}, DEMO_SPARSITY)]
        out["learning_rate"] = [("", {}, DEMO_LEARNING_RATE)]
        for dest, (full, short) in DEMO_BUDGET.items():
            out[dest] = [("", {}, full), ("--quick", {"quick": True}, short)]
    return out


#: what a computed default of ``None`` means, per option
NONE_MEANS = {"block_size": "element masks", "warmup_ratio": "0 (no warm-up)", "max_eval_examples": "all"}


def _show(dest: str, value: Any) -> str:
    if value is None:
        return NONE_MEANS.get(dest, "none")
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_default(command: str, dest: str) -> str:
    """``(default: ...)`` for an option :func:`computed_defaults` lists, e.g. ``(default: 128; 384 for --task
    squad)`` or ``(default: the recipe's: 32 for glue-unstructured; 16 for glue-structured, ...)``."""
    cases = computed_defaults(command)[dest]
    by_value: Dict[str, List[str]] = {}
    for when, _, value in cases:
        by_value.setdefault(_show(dest, value), []).append(when)
    recipe = dest != "recipe" and any("recipe" in opts for _, opts, _ in cases)
    if recipe and len(by_value) == 1:
        return f"(default: the recipe's, {next(iter(by_value))} in every recipe)"
    parts = [value if whens == [""] else f"{value} for {', '.join(w for w in whens if w)}"
             for value, whens in by_value.items()]
    return f"(default: {'the recipe' + chr(39) + 's: ' if recipe else ''}{'; '.join(parts)})"


# -- validation -------------------------------------------------------------------------------------------------

POSITIVE_INTS = ("max_length", "batch_size", "eval_batch_size", "max_query_length", "max_train_examples",
                 "max_eval_examples", "max_steps", "logging_steps", "save_steps", "train_examples", "teacher_steps",
                 "prune_steps")


def validate(o: Dict[str, Any], command: Optional[str]) -> None:
    """Check every option (the one place they are checked); raises OptionError naming the flag."""
    get = o.get
    if get("seed") is not None:
        _need(_is_int(o["seed"]) and o["seed"] >= 0, "seed", o["seed"], "a non-negative integer")
    if get("threads") is not None:
        _need(_is_int(o["threads"]) and o["threads"] >= 1, "threads", o["threads"], "a positive integer")
    _check_task(o, command)
    for dest in POSITIVE_INTS:
        if get(dest) is not None:
            _need(_is_int(o[dest]) and o[dest] >= 1, dest, o[dest], "a positive integer")
    if get("max_length") is not None:
        _need(o["max_length"] <= 4096, "max_length", o["max_length"], "at most 4096 tokens")
    squad = command in ("finetune", "prune", "eval") and is_squad_task(get("task"))
    if squad and get("doc_stride") is not None:  # the length resolve() fills for squad when none is given
        length = get("max_length") or SQUAD_MAX_LENGTH
        _need(_is_int(o["doc_stride"]) and 0 <= o["doc_stride"] < length, "doc_stride", o["doc_stride"],
              f"an integer in [0, --max-length) = [0, {length})")
    for dest in ("squad_dir", "glue_dir"):
        if get(dest) is not None:
            _need(isinstance(o[dest], str) and Path(o[dest]).is_dir(), dest, o[dest], "an existing directory")
    for dest in ("squad_train_file", "squad_dev_file"):
        if get(dest) is not None:
            _need(isinstance(o[dest], str) and Path(o[dest]).is_file(), dest, o[dest],
                  "an existing SQuAD-format JSON file")
    if squad and get("eval_during_training"):
        raise OptionError("--eval-during-training: got it with --task squad, expected it only for GLUE tasks (SQuAD "
                          "exact match / F1 is computed at the end of the run)")
    if get("epochs") is not None:
        _need(_is_num(o["epochs"]) and o["epochs"] > 0, "epochs", o["epochs"], "a positive number")
    if get("learning_rate") is not None:
        _need(_is_num(o["learning_rate"]) and 0 < o["learning_rate"] < 1, "learning_rate", o["learning_rate"],
              "a number in (0, 1)")
    if get("weight_decay") is not None:
        _need(_is_num(o["weight_decay"]) and 0 <= o["weight_decay"] < 1, "weight_decay", o["weight_decay"],
              "a number in [0, 1)")
    if get("warmup_ratio") is not None:
        _need(_is_num(o["warmup_ratio"]) and 0 <= o["warmup_ratio"] < 1, "warmup_ratio", o["warmup_ratio"],
              "a number in [0, 1)")
    if get("sparsity") is not None:
        _need(_is_num(o["sparsity"]) and 0 <= o["sparsity"] < 1, "sparsity", o["sparsity"],
              "a fraction in [0, 1), e.g. 0.9 for 90%")
    if get("method") is not None:
        _need(o["method"] in METHODS, "method", o["method"], f"one of {', '.join(METHODS)}")
    if get("recipe") is not None:
        _need(o["recipe"] in RECIPE_NAMES, "recipe", o["recipe"], f"one of {', '.join(RECIPE_NAMES)}")
    if get("cap") is not None:
        _need(isinstance(o["cap"], bool), "cap", o["cap"], "true or false")
    if get("official") is not None:
        _need(isinstance(o["official"], bool), "official", o["official"], "true or false")
    if get("block_size") is not None:
        _need(o["block_size"] in BLOCK_SIZES, "block_size", o["block_size"], f"one of {list(BLOCK_SIZES)}")
        if command == "prune" and get("method") not in (None, "block-movement", "magnitude"):
            raise OptionError(f"--block-size: got {o['block_size']!r} with --method {o['method']}, expected "
                              f"--block-size only with --method block-movement or magnitude")
    if command == "demo":
        _need(isinstance(get("quick"), bool), "quick", get("quick"), "true or false")
        _need(get("student_init") in STUDENT_INITS, "student_init", get("student_init"),
              f"one of {', '.join(STUDENT_INITS)}")
    if command in ("finetune", "prune", "demo"):
        check_model_arg("model", get("model"))
    if command == "prune":
        check_model_arg("teacher", get("teacher"))
        check_model_arg("prc_model", get("prc_model"))
    if command in ("eval", "predict", "export"):
        check_model_arg("model", get("model"), required=True)
    if command == "eval":
        _check_split(o, squad)
    if command == "predict":
        if not get("text") and not get("input"):
            raise OptionError("--text/--input: got neither, expected at least one --text or an --input file")
        if get("input") not in (None, "-") and not Path(o["input"]).is_file():
            raise OptionError(f"--input: got {o['input']!r}, expected an existing file (or '-' for stdin)")
    _check_output_dir(o, command)


def _check_task(o: Dict[str, Any], command: Optional[str]) -> None:
    task = o.get("task")
    if task is None:
        return
    squad_ok = command in ("finetune", "prune", "eval", None)
    if command == "demo":
        _need(str(task).lower().replace("-", "") == "sst2", "task", task, "sst2 (the demo runs SST-2 only)")
        return
    if squad_ok and is_squad_task(task):
        return
    from ..data import get_glue_task, glue_task_names

    try:
        get_glue_task(task)
    except (ValueError, TypeError, AttributeError):
        names = ", ".join(glue_task_names()) + (", squad" if squad_ok else "")
        raise OptionError(f"--task: got {task!r}, expected one of {names}") from None


def _check_split(o: Dict[str, Any], squad: bool) -> None:
    split = o.get("split")
    try:
        if squad:
            from .tasks import squad_split

            name = squad_split(split)
        else:
            from ..data import get_glue_task

            name = get_glue_task(o["task"]).resolve_split(split)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OptionError(f"--split: got {split!r}, expected a split of {o['task']} ({exc})") from None
    if name.startswith("test"):
        raise OptionError(f"--split: got {split!r}, expected a split with labels (validation or train): GLUE test "
                          f"labels are not public, so there is nothing to score; `capsparse predict` labels "
                          f"unlabelled text")


def check_model_arg(dest: str, value: Any, required: bool = False) -> None:
    """A model argument: ``default``, a hub name, or a directory holding a transformers model or a capsparse
    export (``config.json`` or ``capsparse.json``)."""
    if value is None:
        _need(not required, dest, value, "a model directory")
        return
    _need(isinstance(value, str) and value != "", dest, value, "a model directory, hub name or 'default'")
    if value == "default":
        return
    path = Path(value)
    looks_local = os.sep in value or value.startswith(".") or path.exists()
    if looks_local and not path.is_dir():
        raise OptionError(f"{flag(dest)}: got {value!r}, expected an existing model directory")
    if path.is_dir():
        has = any((path / f).is_file() for f in ("config.json", META_FILE))  # transformers' config, or an export
        _need(has, dest, value, f"a directory with config.json (transformers) or {META_FILE} (compressed export)")


def _check_output_dir(o: Dict[str, Any], command: Optional[str]) -> None:
    """A run directory is never half-overwritten: a non-empty one needs --resume (training) or --overwrite."""
    out, resume, overwrite = o.get("output_dir"), bool(o.get("resume")), bool(o.get("overwrite"))
    if resume and overwrite:
        raise OptionError("--resume/--overwrite: got both, expected one (continue the run, or replace it)")
    if (resume or o.get("save_steps") is not None) and command not in TRAINING_COMMANDS + (None,):
        raise OptionError(f"--resume/--save-steps: got them with {command}, expected them only with "
                          f"{' or '.join(TRAINING_COMMANDS)}")
    if out is None:
        if resume:
            raise OptionError("--resume: got no --output-dir, expected the run directory to continue")
        return
    _need(isinstance(out, str) and out.strip() != "", "output_dir", out, "a directory path")
    path = Path(out)
    _need(not path.exists() or path.is_dir(), "output_dir", out, "a directory (it is a file)")
    from ..distributed import is_main_process

    if command in (None, "demo") or not is_main_process():  # other ranks see the directory rank 0 started
        return
    if resume:
        if not (path / CONFIG_FILE).is_file():
            raise OptionError(f"--resume: {out} holds no run to continue (no {CONFIG_FILE}); start it without --resume")
        return
    if path.is_dir() and any(path.iterdir()):
        if overwrite:
            if not any((path / f).is_file() for f in (CONFIG_FILE, META_FILE)):
                raise OptionError(f"--overwrite: {out} is not a capsparse run directory or export (no {CONFIG_FILE} "
                                  f"or {META_FILE}); refusing to delete it")
            return
        hint = "--resume to continue it, " if command in TRAINING_COMMANDS else ""
        raise OptionError(f"--output-dir: {out} is not empty (an earlier run?); pass {hint}--overwrite to replace "
                          f"it, or choose a new directory")


# -- --cap-option and the CAPConfig -------------------------------------------------------------------------------

def parse_cap_options(items: Optional[List[str]]) -> Dict[str, Any]:
    """``["KEY=VALUE", ...]`` (``--cap-option``) as a dict; values parsed as JSON, else kept as strings."""
    out: Dict[str, Any] = {}
    if isinstance(items, str):
        items = [items]
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


def _coerce(name: str, kind: str, value: Any) -> Any:
    """``value`` as CAPConfig's field ``name`` of annotated type ``kind``: strict (``use_cap=nope`` is an error)."""
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if base == "bool":
        if isinstance(value, bool):
            return value
        if text in ("true", "false"):
            return text == "true"
        expected = "true or false"
    elif base == "int":
        if _is_int(value):
            return value
        expected = "an integer"
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    elif base == "str":
        if isinstance(value, str):
            return value
        expected = "a string"
    elif base.startswith("Tuple"):
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return [v.strip() for v in items]
        expected = 'a list of strings (e.g. ["prc","snc"])'
    else:
        return value
    if optional:
        expected += " or null"
    raise OptionError(f"--cap-option: got {name}={value!r}, expected {expected}")


def coerce_cap_options(values: Dict[str, Any]) -> Dict[str, Any]:
    """Each value converted to its CAPConfig field's type; an unknown key names the known fields."""
    from ..cap.config import CAPConfig

    kinds = {f.name: str(f.type) for f in dataclasses.fields(CAPConfig)}
    out = {}
    for key, value in values.items():
        if key not in kinds:
            raise OptionError(f"--cap-option: got unknown CAPConfig field {key!r}, expected one of "
                              f"{', '.join(sorted(kinds))}")
        out[key] = _coerce(key, kinds[key], value)
    return out


def build_cap_config(o: Dict[str, Any]):
    """The CAPConfig of resolved ``prune`` options: the recipe, then the flags, then ``--cap-option`` values."""
    from ..cap.config import CAPConfig

    updates: Dict[str, Any] = dict(method=o["method"], use_cap=bool(o["cap"]), **(o.get("cap_options") or {}))
    if o.get("sparsity") is not None:
        updates["target_sparsity"] = float(o["sparsity"])
    if o.get("block_size") is not None:
        updates["block_size"] = int(o["block_size"])
    try:
        cfg = CAPConfig.recipe(o["recipe"], official=bool(o.get("official")), **updates)
    except (TypeError, ValueError) as exc:
        field = str(exc).split(":", 1)[0].strip()
        where = flag(FLAG_FIELDS[field]) if field in FLAG_FIELDS else "--cap-option"
        raise OptionError(f"{where}: {' '.join(str(exc).split())}") from None
    if is_squad_task(o.get("task")):
        check_squad_cap_config(cfg)
    return cfg


def check_squad_cap_config(cap_config) -> None:
    """SQuAD has no class labels and its models no pooler: refuse supervised positives / the pooler early."""
    if cap_config.use_cap and cap_config.w_s > 0:
        raise OptionError(f"--task squad: w_s={cap_config.w_s} asks for supervised contrastive positives, which "
                          f"need class labels; use --recipe squad-unstructured / squad-structured (w_s=0) or "
                          f"--cap-option w_s=0")
    if cap_config.use_cap and cap_config.representation == "pooler":
        raise OptionError("--task squad: representation='pooler' needs a pooler, which QA models lack; use the "
                          "squad recipes (raw [CLS]) or --cap-option representation=cls")


def fit_schedule(cfg, total_steps: int, explicit: Dict[str, Any]):
    """Scale the cubic schedule to short budgets: when the recipe's unit in steps leaves no room to prune
    (``(i_w + f_w) * w >= total_steps``) and no schedule field was set explicitly, express ``w`` as
    the official fraction of training (0.1: dense warm-up 20%, pruning 50%, fixed masks 30% for GLUE)."""
    if cfg.structured:
        return cfg
    if any(k in explicit for k in ("schedule_warmup", "schedule_unit", "initial_warmup", "final_warmup")):
        return cfg
    if cfg.schedule_unit == "steps" and (cfg.initial_warmup + cfg.final_warmup) * cfg.schedule_warmup >= total_steps:
        log.info("schedule: the recipe's %g-step unit does not fit %d steps; using %.2f of training as the unit "
                 "(same proportions as the official runs)", cfg.schedule_warmup, total_steps, SHORT_BUDGET_FRACTION)
        cfg = dataclasses.replace(cfg, schedule_unit="fraction", schedule_warmup=SHORT_BUDGET_FRACTION)
    return cfg


def method_label(cap_config) -> str:
    """``CAP-m``, ``movement``, ``CAP-soft``, ``CAP-block``, ``CAP-f``... from a CAPConfig."""
    method = cap_config.method
    if not cap_config.use_cap:
        return method
    return {"movement": "CAP-m", "soft-movement": "CAP-soft", "block-movement": "CAP-block",
            "first-order": "CAP-f", "magnitude": "CAP-magnitude"}.get(method, f"CAP-{method}")
