"""GLUE metrics (numpy) against scikit-learn / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capsparse.data import compute_glue_metrics, main_metric, task_metric_names
from capsparse.data import metrics as M

sk = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _rng_cases(seed, n_cases=25):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n = int(rng.integers(2, 300))
        yield rng, n


def test_fixed_binary():
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    p = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1])
    assert M.accuracy(p, y) == pytest.approx(0.7)
    # tp=4, fp=1, fn=2 -> f1 = 8/11
    assert M.f1(p, y) == pytest.approx(8 / 11)
    assert M.f1(p, y) == pytest.approx(sk.f1_score(y, p))
    assert M.matthews_corrcoef(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))


def test_random_classification_against_sklearn():
    for rng, n in _rng_cases(0):
        k = int(rng.integers(2, 4))
        y = rng.integers(0, k, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
        assert M.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)
        assert M.matthews_corrcoef(p, y) == pytest.approx(sk.matthews_corrcoef(y, p), abs=1e-10)
        if k == 2:
            assert M.f1(p, y) == pytest.approx(sk.f1_score(y, p, zero_division=0.0), abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_degenerate_cases_match_sklearn():
    y = np.array([0, 0, 1, 1])
    p0 = np.zeros(4, dtype=int)
    assert M.matthews_corrcoef(p0, y) == sk.matthews_corrcoef(y, p0) == 0.0
    assert M.f1(p0, y) == sk.f1_score(y, p0, zero_division=0.0) == 0.0
    z = np.zeros(4, dtype=int)
    assert M.f1(z, z) == 0.0
    assert M.matthews_corrcoef(z, z) == pytest.approx(sk.matthews_corrcoef(z, z)) == 0.0


def test_fixed_correlations():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    assert M.pearson(x, y) == pytest.approx(0.8)
    assert M.spearman(x, y) == pytest.approx(0.8)
    assert M.pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(M.pearson(x, np.ones(5)))
    np.testing.assert_allclose(M.rankdata([3, 1, 3, 2, 3]), stats.rankdata([3, 1, 3, 2, 3]))


def test_random_correlations_against_scipy():
    for rng, n in _rng_cases(1):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        if rng.random() < 0.5:  # ties, as in STS-B scores
            x = np.round(x, 1)
            y = np.round(y * 2) / 2
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
        assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
        np.testing.assert_allclose(M.rankdata(y), stats.rankdata(y))


@pytest.mark.parametrize(
    "task,keys,main",
    [
        ("sst2", {"accuracy"}, "accuracy"),
        ("rte", {"accuracy"}, "accuracy"),
        ("qnli", {"accuracy"}, "accuracy"),
        ("mnli", {"accuracy"}, "accuracy"),
        ("mnli-mm", {"accuracy"}, "accuracy"),
        ("mrpc", {"accuracy", "f1"}, "combined_score"),
        ("qqp", {"accuracy", "f1"}, "combined_score"),
        ("cola", {"matthews_correlation"}, "matthews_correlation"),
        ("stsb", {"pearson", "spearmanr"}, "combined_score"),
    ],
)
def test_compute_glue_metrics(task, keys, main):
    rng = np.random.default_rng(7)
    n = 200
    assert main_metric(task) == main
    assert set(task_metric_names(task)) == keys
    if task == "stsb":
        y = rng.uniform(0, 5, n)
        p = y + rng.normal(scale=1.0, size=n)
        out = compute_glue_metrics("STS-B", p[:, None], y)
        assert out["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
        assert out["spearmanr"] == pytest.approx(stats.spearmanr(p, y)[0])
    else:
        k = 3 if task.startswith("mnli") else 2
        y = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), y] += 1.0
        out = compute_glue_metrics(task.upper(), logits, y)
        p = logits.argmax(-1)
        assert out == compute_glue_metrics(task, p, y)
        assert out["accuracy" if "accuracy" in keys else "matthews_correlation"] == pytest.approx(
            sk.accuracy_score(y, p) if "accuracy" in keys else sk.matthews_corrcoef(y, p)
        )
        if "f1" in keys:
            assert out["f1"] == pytest.approx(sk.f1_score(y, p))
    assert set(out) == keys | {"combined_score"}
    assert out["combined_score"] == pytest.approx(np.mean([out[key] for key in keys]))
    assert main in out


def test_unknown_task_and_length_mismatch():
    with pytest.raises(ValueError, match="known tasks"):
        compute_glue_metrics("nope", [0], [0])
    with pytest.raises(ValueError, match="length"):
        compute_glue_metrics("sst2", [0, 1], [0])
