"""Classification metrics, counted by scikit-learn.

Binary tasks report precision/recall/specificity for class 1 (the MedMNIST positive class);
multi-class tasks report macro averages and one-vs-rest macro ROC AUC. A metric that is not
defined on the data (AUC when the split holds one class) is None, never a made-up number.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

SCALARS = (
    "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auc",
)
# The metrics that rest on every class being there in numbers (all but accuracy).
PER_CLASS_SCALARS = SCALARS[1:]


def scarce_class(y_true: np.ndarray, classes: list[str], *, minimum: int) -> str | None:
    """Why per-class metrics cannot be estimated on these labels, e.g. "not estimable (1
    malignant image)": the rarest class has fewer than `minimum` images; None when they can."""
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=len(classes))
    rarest = int(np.argmin(counts))
    if counts[rarest] >= minimum:
        return None
    count = int(counts[rarest])
    return f"not estimable ({count} {classes[rarest]} image{'' if count == 1 else 's'})"


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics from true labels (N,) and predicted class probabilities (N, C)."""
    num_classes = probs.shape[1]
    labels = list(range(num_classes))
    y_pred = probs.argmax(axis=1)
    binary = num_classes == 2
    average = "binary" if binary else "macro"
    # Macro averages run over the classes that occur (as truth or prediction): a class absent from
    # a site's split has no recall, and counting it as 0 would invent a number.
    occurring = labels if binary else np.union1d(y_true, y_pred).tolist()
    with warnings.catch_warnings():
        # Undefined precision on a site that predicts no positives is reported as 0 by sklearn.
        warnings.simplefilter("ignore")
        per_class = skm.multilabel_confusion_matrix(y_true, y_pred, labels=occurring)
        tn, fp = per_class[:, 0, 0], per_class[:, 0, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            specificity_per_class = tn / (tn + fp)
        result = {
            "accuracy": skm.accuracy_score(y_true, y_pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
            "precision": skm.precision_score(y_true, y_pred, labels=occurring, average=average,
                                             zero_division=0),
            "recall": skm.recall_score(y_true, y_pred, labels=occurring, average=average,
                                       zero_division=0),
            "specificity": (specificity_per_class[1] if binary
                            else np.nanmean(specificity_per_class)),
            "f1": skm.f1_score(y_true, y_pred, labels=occurring, average=average, zero_division=0),
            "auc": _auc(y_true, probs),
        }
    result = {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in result.items()}
    result["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    result["n"] = int(len(y_true))
    return result


def _auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return skm.roc_auc_score(y_true, probs[:, 1])
    if len(present) < probs.shape[1]:
        # One-vs-rest is undefined for a class with no examples; average over the classes present.
        scores = [skm.roc_auc_score(y_true == c, probs[:, c]) for c in present]
        return float(np.mean(scores))
    return skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro")


MISSING = "n/a"


def format_number(value: float | None, digits: int = 3) -> str:
    """A metric as every report prints it; a missing or non-finite one as `n/a`."""
    if value is None or not np.isfinite(value):
        return MISSING
    return f"{value:.{digits}f}"
