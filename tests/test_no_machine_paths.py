"""No file the repo ships names a path of one particular machine (results and docs are committed)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ["capsparse", "docs", "benchmarks", "scripts", "tests", "csrc", "README.md", "pyproject.toml",
         "setup.py"]
SUFFIXES = {".py", ".md", ".json", ".csv", ".txt", ".toml", ".cpp", ".h", ".cu", ".cfg", ".yaml", ".yml", ""}
# home and scratch directories of the machines this project has run on
MACHINE_PREFIXES = ("/" + "work/", "/" + "root/", "/" + "home/")


def _files():
    for root in ROOTS:
        path = REPO / root
        paths = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        for p in paths:
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts and p.stat().st_size < 5_000_000:
                yield p


def _hits(paths, base):
    hits = []
    for p in paths:
        text = p.read_text(errors="ignore")
        for prefix in MACHINE_PREFIXES:
            i = text.find(prefix)
            if i >= 0:
                hits.append(f"{p.relative_to(base)}: ...{text[max(0, i - 30):i + 40]!r}...")
    return hits


def test_no_machine_paths_in_shipped_files():
    hits = _hits(_files(), REPO)
    assert not hits, "machine paths in shipped files:\n" + "\n".join(hits[:20])


def test_the_check_sees_a_machine_path(tmp_path):
    bad, good = tmp_path / "bad.json", tmp_path / "good.md"
    bad.write_text('{"capsparse_path": "' + MACHINE_PREFIXES[0] + 'main/capsparse"}')
    good.write_text("runs/r3/dense/seed0 and <repo>/capsparse")
    assert len(_hits([bad, good], tmp_path)) == 1
