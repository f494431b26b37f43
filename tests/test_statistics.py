"""Report statistics against hand-computed and textbook values."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy import stats

from medfed.common.metrics import SCALARS, classification_metrics
from medfed.simulations.statistics import (
    _batch_metrics,
    format_p,
    at_threshold,
    bootstrap_ci,
    mean_std,
    paired_comparison,
    youden_threshold,
)

# Student's sleep data (Cushny & Peebles, 1905): extra hours of sleep under two drugs, same 10
# patients. The textbook paired t-test gives t = 4.0621, df = 9, p = 0.002833.
SLEEP_DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def _probs(y: np.ndarray, separation: float, rng: np.random.Generator, num_classes: int = 2,
           *, tied: bool = False):
    """Softmax probabilities whose true-class logit is raised by `separation`; `tied` rounds the
    logits so many scores tie."""
    logits = rng.normal(size=(len(y), num_classes))
    logits[np.arange(len(y)), y] += separation
    if tied:
        logits = np.round(logits)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _exact_wilcoxon_p(differences) -> float:
    """Two-sided exact signed-rank p by enumerating every sign pattern (zeros dropped)."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    centre = ranks.sum() / 2
    extreme = sum(
        abs(sum(r for r, s in zip(ranks, signs) if s) - centre) >= abs(observed - centre) - 1e-12
        for signs in itertools.product([False, True], repeat=len(d))
    )
    return extreme / 2 ** len(d)


# --- bootstrap ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_batch_metrics_equal_classification_metrics(num_classes):
    """The vectorised scorer behind the bootstrap gives classification_metrics' exact values,
    including absent classes, tied scores and degenerate predictions."""
    rng = np.random.default_rng(num_classes)
    for _ in range(60):
        n = int(rng.integers(1, 30))
        present = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
        y = rng.choice(present, size=n)
        probs = _probs(y, float(rng.choice([0.0, 2.0])), rng, num_classes, tied=rng.random() < 0.3)
        expected = classification_metrics(y, probs)
        order = np.argsort(y, kind="stable")
        got = _batch_metrics(y[order], probs, order[None, :])
        for name in SCALARS:
            if expected[name] is None:
                assert not np.isfinite(got[name][0]), name
            else:
                assert got[name][0] == pytest.approx(expected[name], abs=1e-12), name


@pytest.mark.parametrize("num_classes", [2, 4])
def test_bootstrap_interval_covers_point_estimate(num_classes):
    rng = np.random.default_rng(1)
    y = rng.integers(0, num_classes, size=600)
    probs = _probs(y, 1.0, rng, num_classes)
    point = classification_metrics(y, probs)
    intervals = bootstrap_ci(y, probs, n_resamples=500)
    assert set(intervals) == set(SCALARS)
    for name in SCALARS:
        low, high = intervals[name]
        assert low < point[name] < high, name


def test_bootstrap_narrows_with_more_data():
    rng = np.random.default_rng(2)
    widths = []
    for n in (100, 2000):
        y = rng.integers(0, 2, size=n)
        low, high = bootstrap_ci(y, _probs(y, 1.0, rng), n_resamples=400)["auc"]
        widths.append(high - low)
    # Width shrinks like 1/sqrt(n): about 4.5x here.
    assert widths[1] < widths[0] / 3


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    probs = _probs(y, 1.0, rng)
    assert bootstrap_ci(y, probs, seed=7) == bootstrap_ci(y, probs, seed=7)
    assert bootstrap_ci(y, probs, seed=7)["auc"] != bootstrap_ci(y, probs, seed=8)["auc"]


def test_bootstrap_perfect_separation_gives_degenerate_interval():
    y = np.array([0] * 20 + [1] * 30)
    probs = np.stack([1 - y * 0.8 - 0.1, y * 0.8 + 0.1], axis=1)
    intervals = bootstrap_ci(y, probs, n_resamples=200)
    assert intervals["auc"] == (1.0, 1.0)
    assert intervals["accuracy"] == (1.0, 1.0)


def test_bootstrap_single_class_has_no_auc():
    y = np.ones(40, dtype=int)
    probs = _probs(y, 1.0, np.random.default_rng(4))
    intervals = bootstrap_ci(y, probs, n_resamples=200)
    assert intervals["auc"] is None
    assert intervals["specificity"] is None  # no negatives
    assert intervals["accuracy"] is not None


def test_bootstrap_is_fast_for_a_typical_test_set():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=600)
    probs = _probs(y, 1.0, rng)
    start = time.perf_counter()
    bootstrap_ci(y, probs, n_resamples=1000)
    assert time.perf_counter() - start < 3


# --- operating points --------------------------------------------------------------------------

def test_youden_threshold_on_constructed_scores():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.55, 0.5, 0.6, 0.7, 0.8, 0.9])
    # >= 0.6: sensitivity 4/5, specificity 1 -> J = 0.8; >= 0.5: 1 and 3/4 -> J = 0.75.
    assert youden_threshold(y, scores) == 0.6
    # Separable scores: the lowest positive score catches all positives and no negatives.
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.9]) == 0.35
    assert youden_threshold([1, 1, 1], [0.2, 0.5, 0.9]) is None


def test_at_threshold_counts():
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.55, 0.5, 0.6, 0.7, 0.8, 0.9]
    point = at_threshold(y, scores, 0.5)
    # Called positive: 0.55 (false), 0.5 .. 0.9 (true): tn 3, fp 1, fn 0, tp 5.
    assert point["confusion_matrix"] == [[3, 1], [0, 5]]
    assert point["threshold"] == 0.5
    assert point["sensitivity"] == 1.0
    assert point["specificity"] == 0.75
    assert point["precision"] == pytest.approx(5 / 6)
    assert point["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 0))
    strict = at_threshold(y, scores, 0.6)
    assert strict["confusion_matrix"] == [[4, 0], [1, 4]]
    assert (strict["sensitivity"], strict["specificity"]) == (0.8, 1.0)


def test_at_threshold_undefined_rates_are_none():
    only_negatives = at_threshold([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert only_negatives["sensitivity"] is None
    assert only_negatives["specificity"] == pytest.approx(2 / 3)
    nothing_called = at_threshold([0, 1], [0.1, 0.2], 0.9)
    assert nothing_called["precision"] == 0.0
    assert nothing_called["f1"] == 0.0


# --- paired comparisons ------------------------------------------------------------------------

def test_paired_comparison_on_student_sleep_data():
    result = paired_comparison(SLEEP_DRUG_2, SLEEP_DRUG_1, label_a="drug 2", label_b="drug 1",
                               metric="extra sleep (h)", unit="patients")
    d = np.array(SLEEP_DRUG_2) - np.array(SLEEP_DRUG_1)
    mean = sum(d) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 9)
    t = mean / (sd / math.sqrt(10))
    assert t == pytest.approx(4.0621, abs=1e-4)  # the textbook value
    assert result["ttest_p"] == pytest.approx(2 * stats.t.sf(t, df=9))
    assert result["ttest_p"] == pytest.approx(0.002833, abs=1e-6)
    assert result["cohens_dz"] == pytest.approx(mean / sd)
    assert result["wilcoxon_p"] == pytest.approx(_exact_wilcoxon_p(d))
    assert result["rank_biserial"] == 1.0  # every non-zero difference favours drug 2
    assert (result["wins"], result["ties"], result["losses"]) == (9, 1, 0)
    assert result["n"] == 10 and result["n_dropped"] == 0
    assert result["mean_difference"] == pytest.approx(1.58)
    assert result["mean_a"] == pytest.approx(2.33) and result["mean_b"] == pytest.approx(0.75)
    assert result["std_a"] == pytest.approx(float(np.std(SLEEP_DRUG_2, ddof=1)))
    assert result["note"] is None
    assert result["sentence"] == (
        "drug 2 beats drug 1 at 9 of 10 patients (1 tied; mean extra sleep (h) +1.580; "
        "Wilcoxon p = 0.0039, paired t p = 0.0028, d_z = 1.28)"
    )


def test_paired_comparison_mixed_signs():
    b = [0.5, 0.5, 0.5, 0.5]
    a = [0.51, 0.48, 0.53, 0.54]  # differences +0.01, -0.02, +0.03, +0.04
    result = paired_comparison(a, b, label_a="federated", label_b="local", unit="site-seeds")
    # Ranks of |d|: 1, 2, 3, 4; positive rank sum 8, negative 2.
    assert result["rank_biserial"] == pytest.approx((8 - 2) / 10)
    assert result["wilcoxon_p"] == pytest.approx(_exact_wilcoxon_p(np.subtract(a, b)))
    assert result["wilcoxon_p"] == pytest.approx(6 / 16)
    assert (result["wins"], result["ties"], result["losses"]) == (3, 0, 1)
    assert "cannot reach p < 0.05" in result["note"]
    assert result["sentence"].startswith(
        "federated beats local at 3 of 4 site-seeds (mean AUC +0.015;"
    )


def test_paired_comparison_drops_incomplete_pairs():
    a = [0.9, None, 0.8, float("nan"), 0.7, 0.6]
    b = [0.8, 0.7, None, 0.5, 0.75, 0.5]
    result = paired_comparison(a, b, label_a="A", label_b="B")
    assert result["n"] == 3 and result["n_dropped"] == 3
    assert (result["wins"], result["ties"], result["losses"]) == (2, 0, 1)
    assert result["mean_a"] == pytest.approx(0.7333333333)
    expected = stats.ttest_rel([0.9, 0.7, 0.6], [0.8, 0.75, 0.5]).pvalue
    assert result["ttest_p"] == pytest.approx(expected)
    assert "3 of 6 pairs dropped" in result["note"]


def test_paired_comparison_degenerate_cases():
    same = paired_comparison([0.8, 0.7, 0.9], [0.8, 0.7, 0.9], label_a="A", label_b="B")
    assert same["wilcoxon_p"] is None and same["ttest_p"] is None and same["cohens_dz"] is None
    assert same["ties"] == 3
    assert "all differences are zero" in same["note"]

    shifted = paired_comparison([0.5, 1.5, 2.5], [0.0, 1.0, 2.0], label_a="A", label_b="B")
    assert shifted["wilcoxon_p"] == pytest.approx(0.25)  # 3 positives: 2 / 2**3
    assert shifted["ttest_p"] is None and shifted["cohens_dz"] is None
    assert "every difference is the same" in shifted["note"]
    assert "d_z n/a" in shifted["sentence"]

    single = paired_comparison([0.9, None], [0.8, 0.7], label_a="A", label_b="B")
    assert single["n"] == 1 and single["wilcoxon_p"] is None
    assert "too few for a paired test" in single["note"]

    empty = paired_comparison([None], [0.5], label_a="A", label_b="B", unit="sites")
    assert empty["n"] == 0 and empty["mean_difference"] is None
    assert empty["sentence"] == "no sites where both A and B have AUC values"

    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([0.1], [0.1, 0.2], label_a="A", label_b="B")


def test_p_value_formatting_never_rounds_across_005():
    assert format_p(0.0496) == "= 0.0496"
    assert format_p(0.0612) == "= 0.061"
    assert format_p(0.0004) == "< 0.001"
    assert format_p(None) == "n/a"


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0, None, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([4.0]) == {"mean": 4.0, "std": None, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
