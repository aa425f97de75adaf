"""The ``capsparse`` command line: finetune, prune, eval, export, bench, demo, predict.

This module only parses and prints: flags become an options dict that :func:`capsparse.app.options.resolve`
validates and completes (the same path as a call from Python), and :mod:`capsparse.app` runs the command.
Every subcommand accepts ``--config FILE`` (YAML or JSON: a mapping from option names, with ``-`` or
``_``, to values); flags given on the command line override the file. A bad input (a value, a missing or
unreadable file, a model that does not fit the task) exits with status 2 and one line naming the flag or
file, the value and what was expected, before any model is loaded where the check does not need the model.
Set ``CAPSPARSE_DEBUG=1`` (or pass ``--debug``) to see full tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .app.options import (BLOCK_SIZES, METHODS, RECIPE_NAMES, STUDENT_INITS, computed_defaults, describe_default,
                          resolve)
from .app.options import OptionError as CLIError  # a user error: one line, exit status 2
from .resources import TrainingStopped
from .data import glue_task_names

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


#: where each command writes without --output-dir (app.run.plan_run, app.commands)
OUTPUT_DIRS = {"finetune": "runs/finetune-<task>-<time>", "prune": "runs/prune-<method label>-<task>-<time>",
               "export": "runs/export-model-<time>", "demo": "runs/demo",
               "eval": "none: metrics are printed, nothing is written", "predict": "none: predictions are printed"}


# -- argparse helpers ------------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to a flag's help when it takes a value, has a real default and its help does not
    already say what the default is (no "(default: None)", none on on/off switches)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.nargs == 0 or default is None or default is argparse.SUPPRESS or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default also prints the usage)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _option(p: argparse.ArgumentParser, command: str, flag: str, text: str, unset: Optional[str] = None,
            **kw) -> None:
    """Add ``flag`` with a default of None. When resolve() computes the default (from the task, the recipe or
    --quick), the help names it as :func:`capsparse.app.options.describe_default` gives it; else ``unset`` says
    what no value means."""
    dest = flag[2:].replace("-", "_")
    if dest in computed_defaults(command):
        text = f"{text} {describe_default(command, dest)}"
    elif unset is not None:
        text = f"{text} (default: {unset})"
    p.add_argument(flag, default=None, help=text, **kw)


def _add_common(p: argparse.ArgumentParser, command: str, data: bool = True, train: bool = True, task: bool = True,
                seed: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML or JSON file of option values (keys are option names); command-line flags override it")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="run directory: config.json, metrics.json, run.log, plots and model files go here "
                        f"(default: {OUTPUT_DIRS[command]}); a non-empty one is refused unless "
                        + ("--resume or " if train else "") + "--overwrite")
    p.add_argument("--overwrite", action="store_true", default=False,
                   help="replace a non-empty --output-dir (an earlier run or export) instead of refusing it")
    if seed:
        p.add_argument("--seed", type=int, default=42, help="random seed (data subset, initialisation, shuffling)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--debug", action="store_true", default=False, help="show full tracebacks on errors")
    if data:
        if task:
            p.add_argument("--task", default="sst2",
                           help=f"GLUE task: {', '.join(glue_task_names())}; or squad (SQuAD v1.1 "
                                "question answering: a ...ForQuestionAnswering model, exact match / F1; see the "
                                "SQuAD flags)")
        p.add_argument("--glue-dir", metavar="DIR", default=None,
                       help="local GLUE directory (default: $CAPSPARSE_GLUE_DIR, then shared/glue next to the repo)")
        _option(p, command, "--max-length", "maximum tokens per example (truncation" + (
            "; for squad the question+context window length)" if task else ")"), type=int)
        if command != "eval":  # eval trains nothing: a training batch size there would be silently ignored
            _option(p, command, "--batch-size", "training batch size (per step)", type=int)
        p.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size")
        _option(p, command, "--max-eval-examples", "evaluate on a seeded subset of this many dev examples",
                unset="all", type=int)
    if train:
        p.add_argument("--max-train-examples", type=int, default=None,
                       help="train on a seeded random subset of this many examples (default: the whole train set)")
        p.add_argument("--epochs", type=float, default=3.0, help="training epochs (ignored when --max-steps is set)")
        p.add_argument("--max-steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
        _option(p, command, "--learning-rate", "weight learning rate", type=float)
        _option(p, command, "--weight-decay", "AdamW weight decay", type=float)
        _option(p, command, "--warmup-ratio", "LR warm-up as a fraction of the steps" + (
            " (the *-unstructured recipes: the official warm-up, one schedule unit)" if command == "prune" else ""),
            type=float)
        p.add_argument("--logging-steps", type=int, default=None,
                       help="log loss/sparsity every N steps (default: about 20 points per run)")
        p.add_argument("--eval-during-training", action="store_true", default=False,
                       help="also evaluate on the dev set at every logging step (slower)")
        p.add_argument("--group-by-length", action="store_true", default=False,
                       help="batch examples of similar length together (less padding: faster on CPU)")
        p.add_argument("--save-steps", type=int, default=None,
                       help="write a checkpoint to <output-dir>/checkpoints every N steps, keeping the last two "
                            "(default: none)")
        p.add_argument("--resume", action="store_true", default=False,
                       help="continue the run in --output-dir from its newest complete checkpoint (from step 0 if it "
                            "has none); the options must be the run's")


def _add_squad(p: argparse.ArgumentParser) -> None:
    import textwrap

    about = ("Data: --squad-train-file / --squad-dev-file, else the first of --squad-dir, $CAPSPARSE_SQUAD_DIR, "
             "shared/squad next to the repo holding train-v1.1.json / dev-v1.1.json, else the hub (rajpurkar/squad) "
             "when reachable; a missing file is an error naming where it looked. --max-train-examples / "
             "--max-eval-examples count questions; each gives one or more windows (features). Eval reports "
             "exact_match and f1 (official v1.1 evaluator).")
    g = p.add_argument_group("SQuAD v1.1 (--task squad)", textwrap.fill(about, 78))
    g.add_argument("--squad-dir", metavar="DIR", default=None,
                   help="directory with the SQuAD v1.1 JSON files train-v1.1.json and dev-v1.1.json (default: "
                        "$CAPSPARSE_SQUAD_DIR, then shared/squad next to the repo)")
    g.add_argument("--squad-train-file", metavar="FILE", default=None,
                   help="SQuAD-format JSON for training (overrides --squad-dir for the train split)")
    g.add_argument("--squad-dev-file", metavar="FILE", default=None,
                   help="SQuAD-format JSON for evaluation (overrides --squad-dir for the validation split)")
    g.add_argument("--doc-stride", type=int, default=128,
                   help="overlap in tokens between consecutive windows of a long context (must be < --max-length)")
    g.add_argument("--max-query-length", type=int, default=64,
                   help="questions are cut to this many tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="capsparse", formatter_class=_Formatter,
                     description="High-sparsity pruning of BERT-class models with CAP (Contrastive Pruning).",
                     epilog="Run `capsparse <command> --help` for the options of a command. "
                            "`capsparse demo` runs a small end-to-end example on the default model in minutes.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"capsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("finetune", formatter_class=_Formatter, help="fine-tune a dense model (e.g. a KD teacher)",
                       description="Fine-tune a dense model on a GLUE task or SQuAD v1.1 (--task squad: a "
                                   "question-answering head); the result can serve as --teacher for prune.")
    _add_common(p, "finetune")
    _add_squad(p)
    p.add_argument("--model", default="default",
                   help="model directory or name; 'default' is the bundled all-MiniLM-L6-v2 (6 layers, 384 wide)")

    p = sub.add_parser("prune", formatter_class=_Formatter, help="prune a model (CAP or a plain baseline)",
                       description="Prune while fine-tuning (fine-pruning), with or without CAP's contrastive terms. "
                                   "Defaults come from --recipe (the official CAP scripts: method, sparsity, "
                                   "learning rate, batch size, weight decay, CAP weights); flags override them and "
                                   "a --cap-option may not contradict a flag. Writes a compressed export (only kept "
                                   "weights) to <output-dir>/compressed. --task squad prunes a question-answering "
                                   "model (default recipe squad-unstructured).")
    _add_common(p, "prune")
    _add_squad(p)
    p.add_argument("--model", default="default",
                   help="model to prune (the student's start): a directory, hub name or 'default'")
    p.add_argument("--teacher", default=None,
                   help="fine-tuned dense teacher for distillation (directory; a compressed export works too). "
                        "Without one, and with KD or the FiC bank on, a dense copy of --model is first fine-tuned "
                        "for teacher_epochs (--cap-option teacher_epochs=N) and used as the teacher")
    p.add_argument("--prc-model", default=None,
                   help="dense pre-trained model that encodes CAP's PrC bank (directory, hub name or 'default'). "
                        "Default: the student before its first update, as the official code; when --model is the "
                        "fine-tuned teacher, pass the pre-trained model here, else PrC repeats FiC")
    _option(p, "prune", "--method", "pruning criterion", choices=METHODS)
    p.add_argument("--cap", dest="cap", action="store_true", default=None,
                   help="add CAP's contrastive terms (PrC, SnC, FiC) to the loss (the default)")
    p.add_argument("--no-cap", dest="cap", action="store_false",
                   help="plain baseline: cross-entropy and distillation only, no contrastive terms")
    _option(p, "prune", "--sparsity", "target fraction of pruned encoder-linear weights, in [0, 1); not with "
                                      "soft-movement, whose L1 penalty sets the sparsity reached", type=float)
    _option(p, "prune", "--block-size", f"block side for block-movement (or block magnitude), one of {BLOCK_SIZES}",
            type=int)
    _option(p, "prune", "--recipe", "hyper-parameter defaults from the official CAP scripts (docs/cap.md; "
                                    "--official also undoes capsparse's departures from their code)",
            choices=RECIPE_NAMES)
    p.add_argument("--official", action="store_true", default=False,
                   help="the official CAP code's behaviour where capsparse's recipe departs from it: zero-start "
                        "movement scores and, for GLUE, the pooler as the contrastive query (docs/cap.md, "
                        "differences); --cap-option values still override it")
    p.add_argument("--cap-option", action="append", default=None, metavar="KEY=VALUE",
                   help="set any other CAPConfig field, e.g. --cap-option temperature=0.1 --cap-option w_u=0.1 "
                        "(repeatable; values are parsed as JSON, else taken as strings, and checked against the "
                        "field's type: use_cap=nope is an error)")

    p = sub.add_parser("eval", formatter_class=_Formatter, help="evaluate a model on a GLUE or SQuAD dev set",
                       description="Evaluate a model directory or a compressed export on a GLUE split, or on SQuAD "
                                   "v1.1 (--task squad: exact match and F1 of the official evaluator). Test splits "
                                   "have no public labels and are refused (use predict).")
    _add_common(p, "eval", train=False)
    _add_squad(p)
    p.add_argument("--model", required=False, default=None,
                   help="model directory (transformers format or a capsparse compressed export); required")
    p.add_argument("--split", default="validation", help="split to evaluate (validation/dev or train)")

    p = sub.add_parser("export", formatter_class=_Formatter, help="write a compressed export (only kept weights)",
                       description="Export a pruned model storing only the kept weights. The input is a compressed "
                                   "export (re-exported, e.g. with --fp16) or a transformers directory whose pruned "
                                   "weights are exact zeros (masks are taken from the non-zeros).")
    _add_common(p, "export", data=False, train=False, seed=False)
    p.add_argument("--model", default=None, help="input model directory; required")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"for a transformers input: block layout side in {BLOCK_SIZES} (a block is kept when any "
                        f"of its weights is non-zero; default: element masks)")
    p.add_argument("--fp16", action="store_true", default=False, help="store kept values in float16")

    p = sub.add_parser("bench", formatter_class=_Formatter, help="run a benchmark suite from benchmarks/",
                       description="Run benchmarks/bench_<SUITE>.py's main(argv); arguments after the suite name "
                                   "are passed to it (use `capsparse bench SUITE -- --help` for its options).")
    p.add_argument("suite", nargs="?", default=None, help="suite name (bench_<suite>.py); omit to list suites")
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help="arguments for the suite")
    p.add_argument("--config", metavar="FILE", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", default=False, help="show full tracebacks on errors")

    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help="small end-to-end demo: teacher, CAP-m vs movement at 90%%, export, table",
                       description="On the default model and SST-2: fine-tune a teacher briefly, prune to --sparsity "
                                   "with CAP-m and with plain movement (same budget), evaluate both on SST-2 dev, "
                                   "export both and print a table. About 10 minutes on 2 CPU cores; --quick is a "
                                   "1-2 minute smoke run.")
    _add_common(p, "demo", train=False, task=False)
    p.set_defaults(task="sst2")
    p.add_argument("--model", default="default", help="model directory or 'default'")
    p.add_argument("--quick", action="store_true", default=False,
                   help="tiny budget (a smoke test: numbers are not meaningful)")
    _option(p, "demo", "--train-examples", "SST-2 training subset size", type=int)
    _option(p, "demo", "--teacher-steps", "teacher fine-tuning steps", type=int)
    _option(p, "demo", "--prune-steps", "pruning steps per method", type=int)
    _option(p, "demo", "--sparsity", "target sparsity for both pruned models", type=float)
    p.add_argument("--student-init", choices=STUDENT_INITS, default="teacher",
                   help="start both pruned models from the briefly fine-tuned teacher (a few hundred steps cannot "
                        "fine-tune and prune from the pre-trained model), or from the pre-trained model as the paper")
    _option(p, "demo", "--learning-rate", "weight learning rate, teacher and pruning", type=float)

    p = sub.add_parser("predict", formatter_class=_Formatter, help="classify sentences with a model",
                       description="Print the predicted label (and probabilities) for each input; with --output-dir "
                                   "also write them to <output-dir>/predictions.jsonl.")
    _add_common(p, "predict", data=False, train=False, seed=False)
    p.add_argument("--model", default=None, help="model directory (transformers or compressed export); required")
    p.add_argument("--text", action="append", default=None,
                   help="input text (repeatable); for sentence-pair tasks separate the pair with ' ||| '")
    p.add_argument("--input", metavar="FILE", default=None, help="file with one input per line ('-' for stdin)")
    p.add_argument("--task", default=None, help="GLUE task, for label names (default: the model config's labels)")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per input")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size")
    p.add_argument("--json", action="store_true", default=False, help="print one JSON object per line")
    return parser


# -- config files ------------------------------------------------------------------------------------------

def load_config_file(path: str) -> Dict[str, Any]:
    """A mapping from a YAML (``.yaml``/``.yml``) or JSON file; other extensions: JSON, then YAML."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config: file {path!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise CLIError(f"--config: cannot read {path!r} as UTF-8 text ({type(exc).__name__})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                data = json.loads(text)
            except ValueError:
                import yaml

                data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"--config: cannot parse {path!r} ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(f"--config: expected a mapping of option names to values in {path!r}, got "
                       f"{type(data).__name__}")
    return data


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _coerce_config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A config value converted as the flag would convert it; a value of the wrong kind is a CLIError."""
    if value is None:
        return None
    type_name = getattr(action.type, "__name__", "a valid value")
    if action.nargs == 0:  # on/off flags (store_true, --cap/--no-cap)
        if not isinstance(value, bool):
            raise CLIError(f"{where}: expected true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_coerce_config_value(_single(action), item, where) for item in items]
    if isinstance(value, (list, dict, bool)):
        raise CLIError(f"{where}: expected a single {type_name}")
    if action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise CLIError(f"{where}: expected {type_name}") from None
    return value


def _single(action: argparse.Action) -> argparse.Action:
    """A stand-in for one element of an append action (same type and choices)."""
    return argparse.Action(option_strings=[], dest=action.dest, type=action.type, choices=action.choices)


def _apply_config(sub: argparse.ArgumentParser, config: Dict[str, Any], path: str) -> None:
    """Set the subparser's defaults from ``config`` (so that explicit flags still win)."""
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest in ("no_cap",):
            dest, value = "cap", not value
        if dest not in actions:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise CLIError(f"--config: unknown option {key!r} in {path!r}; known options: {known}")
        action = actions[dest]
        if dest == "cap_option" and isinstance(value, dict):  # a mapping is allowed for --cap-option
            value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
        value = _coerce_config_value(action, value, f"--config: option {key!r} in {path!r} = {value!r}")
        if action.choices is not None and value is not None and value not in action.choices:
            raise CLIError(f"--config: option {key!r} in {path!r} = {value!r}: expected one of "
                           f"{list(action.choices)}")
        defaults[dest] = value
    sub.set_defaults(**defaults)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` support; returns the validated namespace (raises CLIError / SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        config = load_config_file(args.config)
        sub = _subparser(parser, args.command)
        _apply_config(sub, config, args.config)
        args = parser.parse_args(argv)
    validate(args)
    return args


# -- validation ------------------------------------------------------------------------------------------------

def validate(args: argparse.Namespace) -> None:
    """Validate and complete the parsed options (:func:`capsparse.app.options.resolve`, the one place options are
    checked); the namespace gets the resolved values. Raises CLIError naming the flag, value and expectation."""
    if args.command == "bench":
        return
    given = {k: v for k, v in vars(args).items() if k not in ("config", "debug")}
    if args.command == "predict":
        given.setdefault("task", None)
    vars(args).update(resolve(given, args.command))


# -- commands --------------------------------------------------------------------------------------------------

def list_bench_suites() -> List[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def run_bench(suite: Optional[str], suite_args: List[str]) -> int:
    import importlib.util

    suites = list_bench_suites()
    if suite is None:
        print("available benchmark suites: " + (", ".join(suites) if suites else f"none (no {BENCH_DIR}/bench_*.py)"))
        return 0
    path = BENCH_DIR / f"bench_{suite}.py"
    if not path.is_file():
        raise CLIError(f"bench: got suite {suite!r}, expected one of {suites or '(none found)'} "
                       f"(looked for {path})")
    if suite_args and suite_args[0] == "--":
        suite_args = suite_args[1:]
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"capsparse_bench_{suite}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "main"):
            raise CLIError(f"bench: {path} has no main(argv) function")
        result = module.main(list(suite_args))
    finally:
        if sys.path and sys.path[0] == str(BENCH_DIR):
            sys.path.pop(0)
    return int(result) if isinstance(result, int) else 0


#: commands that train and so may run under ``torchrun``; the others run in one process
DISTRIBUTED_COMMANDS = ("finetune", "prune")


def dispatch(args: argparse.Namespace) -> int:
    from .distributed import world_size

    if world_size() > 1 and args.command not in DISTRIBUTED_COMMANDS:
        raise CLIError(f"`capsparse {args.command}` runs in one process, but this is a launch of {world_size()} "
                       f"processes (WORLD_SIZE={world_size()}); run it without torchrun (only "
                       f"{' and '.join(DISTRIBUTED_COMMANDS)} train across processes)")
    if args.command == "bench":
        return run_bench(args.suite, args.suite_args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from .app import commands, demo

    options = {k: v for k, v in vars(args).items() if k not in ("config", "debug")}
    fn = {"finetune": commands.finetune, "prune": commands.prune, "eval": commands.evaluate,
          "export": commands.export, "demo": demo.demo, "predict": commands.predict}[args.command]
    fn(options)
    return 0


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split()) or '(no message)'}"[:1000]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``capsparse`` console script. Returns the exit status (also used by ``sys.exit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CAPSPARSE_DEBUG", "") not in ("", "0")
    try:
        args = parse_args(argv)
        code = dispatch(args)
        from .distributed import shutdown_distributed  # under torchrun: every rank leaves together

        shutdown_distributed()
        return code
    except CLIError as exc:  # a bad input, named by the check that found it
        if debug:
            raise
        print(f"capsparse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError, ValueError, OSError) as exc:  # bad data, files, environment
        if debug:
            raise
        print(f"capsparse: error: {_one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # Ctrl-C / SIGTERM: checkpoint kept, nothing evaluated; 128 + the signal number
        print(f"capsparse: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:  # the run itself failed (e.g. it missed its target sparsity): not an input error
        if debug:
            raise
        print(f"capsparse: error: {_one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("capsparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
