"""``--help`` says each default once, and says the default that runs.

For every subcommand and option: at most one ``(default: ...)``, never ``(default: None)``; an option with a fixed
default shows it and the parsed, resolved namespace holds it; an option whose default ``resolve()`` computes shows
:func:`capsparse.app.options.describe_default`, and each case it names (``--task squad``, a recipe, ``--quick``) is
parsed through the CLI and must resolve to the value shown.
"""
import argparse
import json

import pytest

from capsparse import cli
from capsparse.app.options import computed_defaults, describe_default

COMMANDS = ("finetune", "prune", "eval", "export", "demo", "predict")
#: defaults decided at run time, not by resolve(): their help words cannot be compared with a resolved value
RUNTIME_DEFAULTS = {
    "output_dir": "the run directory is named at run time (command, task, time)",
    "glue_dir": "looked up at load time ($CAPSPARSE_GLUE_DIR, then shared/glue)",
    "squad_dir": "looked up at load time ($CAPSPARSE_SQUAD_DIR, then shared/squad)",
    "threads": "torch's own choice",
    "max_train_examples": "the whole train set",
    "max_eval_examples": "all dev examples",
    "logging_steps": "about 20 points per run, from the step count",
    "save_steps": "no checkpoints",
    "task": "predict: the model config's labels",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(path)


def _minimal(command, model_dir):
    return {"eval": ["--model", model_dir], "export": ["--model", model_dir],
            "predict": ["--model", model_dir, "--text", "a sentence"]}.get(command, [])


def _flags(options):
    argv = []
    for dest, value in options.items():
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _valued_options(sub):
    for action in sub._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS and action.nargs != 0 \
                and action.dest not in ("help", "config"):
            yield action


def _help_string(sub, action):
    return sub._get_formatter()._get_help_string(action)


def _problems(command, sub, resolved):
    """What is wrong with the defaults ``sub``'s help shows, against the ``resolved`` namespace."""
    computed = computed_defaults(command)
    found = []
    for action in _valued_options(sub):
        text, dest = _help_string(sub, action), action.dest
        where = f"{command} {action.option_strings[0]}: {text!r}"
        if text.count("(default") > 1 or "(default: None)" in text:
            found.append(f"two defaults or a None default in {where}")
        if dest in computed:
            if action.default is not None:  # resolve() fills it: a parser default would hide the computed one
                found.append(f"{where}: parser default {action.default!r} for a computed default")
            if not text.endswith(describe_default(command, dest)):
                found.append(f"{where}: expected {describe_default(command, dest)!r}")
        elif action.default is not None:
            shown = f"(default: {action.default})" in text or ("default" in text and str(action.default) in text)
            if not shown or resolved.get(dest) != action.default:
                found.append(f"{where}: parser default {action.default!r}, runs {resolved.get(dest)!r}")
        elif "(default" in text and dest not in RUNTIME_DEFAULTS:
            found.append(f"{where}: a default in words that nothing checks; compute it in "
                         f"app.options.computed_defaults or list it in RUNTIME_DEFAULTS")
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_each_default_said_once_and_as_it_runs(command, model_dir):
    sub = cli._subparser(cli.build_parser(), command)
    resolved = vars(cli.parse_args([command] + _minimal(command, model_dir)))
    assert _problems(command, sub, resolved) == []


def test_the_check_sees_a_wrong_or_double_default(model_dir):
    """The check itself: the bugs it exists for are reported (a parser default hiding a computed one, as the demo's
    max_length 64 once did under a help that said 128; a help that names another value; two defaults)."""
    sub = cli._subparser(cli.build_parser(), "finetune")
    resolved = vars(cli.parse_args(["finetune"]))
    sub.set_defaults(max_length=64)
    seed = next(a for a in sub._actions if a.dest == "seed")
    seed.help = "random seed (default: 7)"
    epochs = next(a for a in sub._actions if a.dest == "epochs")
    epochs.help = "training epochs (default: 3.0) (default: 3.0)"
    found = " | ".join(_problems("finetune", sub, resolved))
    assert "--max-length" in found and "parser default 64" in found
    assert "--seed" in found and "--epochs" in found and "two defaults" in found


@pytest.mark.parametrize("command", ("finetune", "prune", "eval", "demo"))
def test_computed_defaults_are_what_resolves(command, model_dir):
    cases = computed_defaults(command)
    assert cases  # the table is not empty for a command that has computed defaults
    for dest, rows in cases.items():
        for when, options, value in rows:
            args = cli.parse_args([command] + _minimal(command, model_dir) + _flags(options))
            assert getattr(args, dest) == value, f"{command} {dest} {when or '(plain)'}: help says {value!r}, " \
                                                 f"resolves to {getattr(args, dest)!r}"


def test_the_demo_resolves_the_same_from_python():
    """The demo's budget comes from resolve(), not from argparse: a Python call gets what the CLI gets."""
    from capsparse.app.options import resolve

    keys = ("max_length", "sparsity", "learning_rate", "train_examples", "teacher_steps", "prune_steps",
            "max_eval_examples", "student_init", "batch_size")
    for argv, options in (([], {}), (["--quick"], {"quick": True})):
        a = vars(cli.parse_args(["demo"] + argv))
        o = resolve(options, "demo")
        assert {k: a[k] for k in keys} == {k: o[k] for k in keys}, argv
