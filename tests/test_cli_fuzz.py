"""Fuzzed --config files and flags: the CLI either accepts them or fails with exit 2 and a one-line message."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsparse import cli

PRUNE_KEYS = ["task", "method", "sparsity", "block_size", "epochs", "max_steps", "seed", "batch_size", "max_length",
              "max_train_examples", "recipe", "cap", "learning_rate", "glue_dir", "teacher", "model", "cap_option"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))
CONFIGS = st.dictionaries(st.one_of(st.sampled_from(PRUNE_KEYS), st.text(max_size=10)), VALUES, max_size=6)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _outcome(argv, capsys):
    """'accepted' or 'rejected'; anything but a clean exit-2 rejection fails the test."""
    try:
        cli.parse_args(argv)
        return "accepted"
    except cli.CLIError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), f"multi-line error: {message!r}"
        return "rejected"
    except SystemExit as exc:  # argparse errors
        assert exc.code == 2, f"argparse exit {exc.code}"
        assert capsys.readouterr().err.strip(), "argparse exit without a message"
        return "rejected"


@SETTINGS
@given(config=CONFIGS, as_yaml=st.booleans())
def test_fuzzed_config_files(tmp_path, capsys, config, as_yaml):
    path = tmp_path / ("c.yaml" if as_yaml else "c.json")
    text = json.dumps(config)  # JSON is valid YAML too
    path.write_text(text)
    _outcome(["prune", "--config", str(path)], capsys)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_garbage_config_bytes_are_rejected_cleanly(tmp_path, capsys, data):
    path = tmp_path / "garbage.yaml"
    path.write_bytes(data)
    _outcome(["prune", "--config", str(path)], capsys)


@pytest.mark.parametrize("argv", [
    ["prune", "--sparsity", "1.0"], ["prune", "--sparsity", "-0.1"], ["prune", "--block-size", "24"],
    ["prune", "--epochs", "0"], ["prune", "--batch-size", "-3"], ["prune", "--max-length", "0"],
    ["prune", "--task", "imagenet"], ["prune", "--method", "random"], ["eval"], ["finetune", "--seed", "x"],
    ["prune", "--config", "/no/such/file.yaml"], ["bench", "no-such-suite"],
])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    code = None
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert err and "Traceback" not in err
