"""Dependencies point one way (docs/design.md, "Layout"): every import inside capsparse/, at module level or inside a
function (a lazy import is still a dependency), goes to the same layer or a lower one. A new top-level module must
be given a layer here, so that the table stays the whole map."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "capsparse"

#: layer of each top-level module or package of capsparse, lowest first
LAYERS = {
    # support with no capsparse dependency: block layouts, torchrun helpers, NaN guard, atomic files, budgets
    "layout": 0, "distributed": 0, "guards": 0, "checkpoint": 0, "resources": 0, "_lazy": 0,
    "backends": 1, "_C": 1, "_C_cuda": 1, "kernels": 1,  # kernels and their per-call choice
    "ops": 2,  # custom ops: reference + fast path + autograd
    "nn": 3,  # SparseLinear
    "surgery": 4, "sparsity": 4,  # nn.Linear <-> SparseLinear in a model; the one sparsity report
    "models": 4, "export": 4, "pretrained": 4,  # model files: the default model, compressed exports, save/load
    "pruning": 5,  # criteria, schedules, structured masks
    "cap": 6,  # CAPConfig, banks, losses, CAPTrainer
    "data": 7, "runlog": 7, "plots": 7,  # GLUE/SQuAD data and metrics, run directories, plots: for the app only
    "app": 8,  # options, tasks, the run skeleton, commands, demo
    "cli": 9, "__main__": 9,  # parse and print
    "": 10,  # the package facade (capsparse/__init__.py) re-exports lazily from every layer
}
#: the one name any layer may take from the facade
FACADE_NAMES = {"__version__"}
#: from pruning up (the facade aside), kernels are reached through the ops (which resolve the backend before
#: autograd), never through capsparse.backends: no second place that chooses a backend or skips an op's checks
THROUGH_OPS_FROM = LAYERS["pruning"]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT):
    """``(imported capsparse module, names, line)`` for every import in ``path``."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if target == "capsparse":  # from . import x: x is the module (or a facade name)
                for n in names:
                    yield (f"capsparse.{n}" if n not in FACADE_NAMES else "capsparse"), [n], node.lineno
            elif target.startswith("capsparse."):
                yield target, names, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "capsparse" or a.name.startswith("capsparse."):
                    yield a.name, [], node.lineno


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _files():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    unplaced = sorted({_layer_key(_module_name(p)) for p in _files()} - set(LAYERS))
    assert not unplaced, f"give these capsparse modules a layer in tests/test_layering.py: {unplaced}"


def test_no_import_points_up():
    upward = []
    for path in _files():
        here = _module_name(path)
        mine = LAYERS.get(_layer_key(here))
        for target, names, line in _imports(path):
            key = _layer_key(target)
            if key == "" and set(names) <= FACADE_NAMES:
                continue
            theirs = LAYERS.get(key)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line}: {here} (layer {mine}) imports {target} "
                              f"(layer {theirs})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def _skips_the_ops(module: str, target: str) -> bool:
    mine = LAYERS.get(_layer_key(module))
    return (_layer_key(target) == "backends" and mine is not None
            and THROUGH_OPS_FROM <= mine < LAYERS[""])


def test_pruning_and_above_go_through_the_ops():
    """pruning, cap, app (and everything above them) never import capsparse.backends: the functional ops
    (capsparse.ops.*) choose the backend, in one place."""
    skipping = []
    for path in _files():
        here = _module_name(path)
        for target, _, line in _imports(path):
            if _skips_the_ops(here, target):
                skipping.append(f"{path.relative_to(ROOT.parent)}:{line}: {here} imports {target}")
    assert not skipping, "imports of the backends above the ops (call a capsparse.ops function):\n" + \
        "\n".join(skipping)


@pytest.mark.parametrize("package", ["pruning", "cap", "app"])
@pytest.mark.parametrize("source", ["from ..backends.registry import resolve_backend\n",
                                    "def f():\n    import capsparse.backends.cpu\n",
                                    "from capsparse import backends\n"])
def test_the_checker_sees_a_backend_import_above_the_ops(tmp_path, package, source):
    fake_root = tmp_path / "capsparse"
    (fake_root / package).mkdir(parents=True)
    path = fake_root / package / "probe.py"
    path.write_text(source)
    here = _module_name(path, fake_root)
    assert any(_skips_the_ops(here, target) for target, _, _ in _imports(path, fake_root))
    assert not _skips_the_ops("capsparse.ops.probe", "capsparse.backends.registry")  # the ops may


@pytest.mark.parametrize("source, expected", [
    ("from ..app import options\n", "capsparse.app"),
    ("from capsparse.cli import main\n", "capsparse.cli"),
    ("def f():\n    from ..cap.trainer import CAPTrainer\n", "capsparse.cap.trainer"),
])
def test_the_checker_sees_lazy_and_relative_imports(tmp_path, source, expected):
    """The check itself: relative, absolute and function-level imports are all found (a checker that saw none
    would pass every tree)."""
    fake_root = tmp_path / "capsparse"
    (fake_root / "ops").mkdir(parents=True)
    path = fake_root / "ops" / "probe.py"
    path.write_text(source)
    assert expected in [target for target, _, _ in _imports(path, fake_root)]
    assert LAYERS[_layer_key(expected)] > LAYERS["ops"]  # each would be reported as pointing up
