"""Plots: titles name the run and the method; curves with identical values stay visible (distinct styles)."""
import json

import pytest

pytest.importorskip("matplotlib")

from capsparse import plots


@pytest.fixture
def drawn(monkeypatch):
    """The axes of every figure the plots module finishes (title, lines) after it is saved."""
    axes = []
    finish = plots._finish

    def spy(plt, fig, ax, title, path):
        out = finish(plt, fig, ax, title, path)
        axes.append(ax)
        return out

    monkeypatch.setattr(plots, "_finish", spy)
    return axes


def _history():
    # two loss curves and two sparsity curves with identical values
    return [{"step": s, "loss": 1.0 / s, "ce": 1.0 / s, "sparsity": 0.1 * s, "target_sparsity": 0.1 * s}
            for s in range(1, 6)]


def test_run_plots_name_the_run_and_the_method(tmp_path, drawn):
    run = tmp_path / "sst2-cap-90"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {"method": "movement"}}))
    written = plots.plot_run(_history(), run, target_sparsity=0.5)
    assert [p.name for p in written] == ["losses.png", "sparsity.png"] and all(p.stat().st_size for p in written)
    assert [ax.get_title() for ax in drawn] == ["training losses: sst2-cap-90 (movement)",
                                                "sparsity schedule: sst2-cap-90 (movement)"]
    drawn.clear()
    plots.plot_run(_history(), run, run_name="rerun", method="magnitude")
    assert drawn[0].get_title() == "training losses: rerun (magnitude)"


def test_identical_curves_get_distinct_styles(tmp_path, drawn):
    plots.plot_run(_history(), tmp_path)
    plots.plot_accuracy_vs_sparsity([{"method": m, "sparsity": s, "mean": 80.0} for m in ("CAP-m", "movement")
                                     for s in (0.5, 0.9)], tmp_path / "acc.png")
    for ax in drawn:
        lines = [c.lines[0] for c in ax.containers] or [l for l in ax.get_lines() if len(l.get_xdata()) > 1]
        assert len(lines) == 2
        (a, b) = lines
        assert list(a.get_ydata()) == list(b.get_ydata())                      # the same values...
        assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())  # ...both visible
        assert a.get_marker() not in (None, "None", "") and b.get_marker() not in (None, "None", "")


def test_run_title_leaves_out_what_is_unknown():
    assert plots.run_title("losses") == "losses"
    assert plots.run_title("losses", "r1") == "losses: r1"
    assert plots.run_title("losses", None, "movement") == "losses: (movement)"
