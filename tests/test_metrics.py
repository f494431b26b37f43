"""classification_metrics against hand-computed small cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medfed.common.metrics import SCALARS, classification_metrics, scarce_class


def _pairwise_auc(positive_scores, negative_scores) -> float:
    """Mann-Whitney AUC: fraction of (positive, negative) pairs ranked right, ties count half."""
    pairs = list(itertools.product(positive_scores, negative_scores))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def _binary_probs(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=1)


def test_binary_by_hand():
    y = np.array([0, 0, 1, 1, 1])
    p1 = [0.2, 0.6, 0.7, 0.4, 0.9]           # predictions 0, 1, 1, 0, 1
    result = classification_metrics(y, _binary_probs(p1))
    tp, fn, fp, tn = 2, 1, 1, 1
    precision = tp / (tp + fp)               # 2/3
    recall = tp / (tp + fn)                  # 2/3
    specificity = tn / (tn + fp)             # 1/2
    assert result["accuracy"] == pytest.approx((tp + tn) / 5)
    assert result["precision"] == pytest.approx(precision)
    assert result["recall"] == pytest.approx(recall)
    assert result["specificity"] == pytest.approx(specificity)
    assert result["balanced_accuracy"] == pytest.approx((recall + specificity) / 2)  # 7/12
    assert result["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    # Pairs (pos, neg): 0.7>0.2, 0.7>0.6, 0.4>0.2, 0.4<0.6, 0.9>0.2, 0.9>0.6 -> 5/6.
    assert result["auc"] == pytest.approx(5 / 6)
    assert result["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert result["n"] == 5
    for key in SCALARS:
        assert isinstance(result[key], float), key


def test_binary_ties_in_auc():
    y = np.array([0, 1, 0, 1])
    p1 = [0.3, 0.3, 0.1, 0.8]
    result = classification_metrics(y, _binary_probs(p1))
    assert result["auc"] == pytest.approx(_pairwise_auc([0.3, 0.8], [0.3, 0.1]))  # 0.875


def test_binary_all_predicted_negative():
    y = np.array([0, 1, 1, 0])
    result = classification_metrics(y, _binary_probs([0.1, 0.2, 0.3, 0.4]))
    assert result["precision"] == 0.0       # undefined -> reported as 0 (zero_division)
    assert result["recall"] == 0.0
    assert result["specificity"] == 1.0
    assert result["f1"] == 0.0
    assert result["auc"] == pytest.approx(0.5)  # pairs: 0.2>0.1, 0.2<0.4, 0.3>0.1, 0.3<0.4
    assert result["confusion_matrix"] == [[2, 0], [2, 0]]


def test_one_class_split_has_no_auc():
    y = np.array([1, 1, 1])
    result = classification_metrics(y, _binary_probs([0.9, 0.4, 0.8]))
    assert result["auc"] is None
    assert result["specificity"] is None      # no negatives: undefined, not made up
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["confusion_matrix"] == [[0, 0], [1, 2]]
    assert result["n"] == 3


MC_Y = np.array([0, 0, 1, 1, 2, 2])
MC_PROBS = np.array([
    [0.7, 0.2, 0.1],   # 0 -> 0
    [0.3, 0.5, 0.2],   # 0 -> 1
    [0.2, 0.6, 0.2],   # 1 -> 1
    [0.1, 0.3, 0.6],   # 1 -> 2
    [0.2, 0.2, 0.6],   # 2 -> 2
    [0.4, 0.35, 0.25], # 2 -> 0
])


def test_multiclass_macro_by_hand():
    result = classification_metrics(MC_Y, MC_PROBS)
    # Confusion matrix rows = true, columns = predicted.
    cm = [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert result["confusion_matrix"] == cm
    assert result["n"] == 6
    assert result["accuracy"] == pytest.approx(3 / 6)
    # Per class: tp=1 each; predicted counts 2,2,2; true counts 2,2,2.
    precision = [1 / 2, 1 / 2, 1 / 2]
    recall = [1 / 2, 1 / 2, 1 / 2]
    # Specificity per class: tn / (tn + fp) with 4 negatives and 1 false positive each.
    specificity = [3 / 4, 3 / 4, 3 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    _assert_macro(result, MC_Y, MC_PROBS, precision=precision, recall=recall,
                  specificity=specificity, f1=f1)


def test_multiclass_unequal_classes_macro():
    y = np.array([0, 0, 0, 1, 2])
    probs = np.array([
        [0.8, 0.1, 0.1],   # 0 -> 0
        [0.6, 0.3, 0.1],   # 0 -> 0
        [0.2, 0.7, 0.1],   # 0 -> 1
        [0.1, 0.8, 0.1],   # 1 -> 1
        [0.5, 0.1, 0.4],   # 2 -> 0
    ])
    result = classification_metrics(y, probs)
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 0]]
    precision = [2 / 3, 1 / 2, 0.0]          # class 2 is never predicted -> 0
    recall = [2 / 3, 1.0, 0.0]
    specificity = [1 / 2, 3 / 4, 4 / 4]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    assert result["accuracy"] == pytest.approx(3 / 5)
    _assert_macro(result, y, probs, precision=precision, recall=recall,
                  specificity=specificity, f1=f1)


def test_multiclass_missing_class_still_has_auc():
    y = np.array([0, 0, 1, 1])               # class 2 absent from this split
    probs = np.array([
        [0.6, 0.3, 0.1],
        [0.3, 0.2, 0.5],
        [0.2, 0.7, 0.1],
        [0.5, 0.4, 0.1],
    ])
    result = classification_metrics(y, probs)
    assert result["auc"] is not None and math.isfinite(result["auc"])
    expected = np.mean([
        _pairwise_auc(probs[y == c, c], probs[y != c, c]) for c in (0, 1)
    ])
    assert result["auc"] == pytest.approx(expected)
    assert result["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert result["n"] == 4


def test_multiclass_one_class_split_no_auc():
    y = np.array([2, 2])
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    result = classification_metrics(y, probs)
    assert result["auc"] is None
    assert result["accuracy"] == pytest.approx(0.5)


def test_multiclass_macro_ignores_a_class_absent_from_the_split():
    # A perfect classifier on a 3-class task whose split holds classes 0 and 1 only.
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, probs)
    assert m["recall"] == 1.0 and m["precision"] == 1.0 and m["f1"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert np.asarray(m["confusion_matrix"]).shape == (3, 3)


def _assert_macro(result, y, probs, *, precision, recall, specificity, f1):
    """Macro metrics equal the means of the hand-computed per-class values."""
    assert result["precision"] == pytest.approx(np.mean(precision))
    assert result["recall"] == pytest.approx(np.mean(recall))
    assert result["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert result["specificity"] == pytest.approx(np.mean(specificity))
    assert result["f1"] == pytest.approx(np.mean(f1))
    expected_auc = np.mean([_pairwise_auc(probs[y == c, c], probs[y != c, c])
                            for c in range(probs.shape[1])])
    assert result["auc"] == pytest.approx(expected_auc)


def test_a_class_with_too_few_images_makes_per_class_metrics_not_estimable():
    classes = ["malignant", "normal, benign"]
    assert scarce_class(np.array([1] * 8 + [0]), classes, minimum=5) == \
        "not estimable (1 malignant image)"
    assert scarce_class(np.array([1] * 8), classes, minimum=5) == \
        "not estimable (0 malignant images)"
    assert scarce_class(np.array([0] * 5 + [1] * 5), classes, minimum=5) is None
    assert scarce_class(np.array([0] * 4 + [1] * 50), classes, minimum=5) == \
        "not estimable (4 malignant images)"
