"""Statistics behind the evidence report: uncertainty of one model's test metrics, operating
points for a binary decision, and paired comparisons between training modes.

A single test-set number hides how much it would move on another sample of patients, and a mean
over sites hides whether one mode wins consistently. This module owns those answers — bootstrap
confidence intervals, the Youden operating point chosen on validation data, and paired tests with
effect sizes and a plain-English sentence — so every report states them the same way. Tests and
rank statistics come from scipy and scikit-learn; a value that is not defined on the data is None,
as in `metrics.classification_metrics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from medfed.common.metrics import SCALARS

# A metric undefined in more than half the resamples would get an interval from a biased subset.
MIN_VALID_FRACTION = 0.5
# Bound on resamples x examples x classes held at once, so a large multi-class test set fits.
_CHUNK_ELEMENTS = 4_000_000
# The exact two-sided Wilcoxon p is at least 2 / 2**n: below 6 non-zero pairs it never reaches 0.05.
WILCOXON_MIN_FOR_005 = 6


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap interval for every metric in `metrics.SCALARS`.

    Test examples are resampled with replacement within each true class (stratified, as pROC does
    for AUC), so every resample keeps the test set's prevalence and AUC stays defined whenever it
    is defined on the full set. Each resample is scored exactly as `classification_metrics` scores
    a test set. Resamples where a metric is undefined are skipped; the interval is None when fewer
    than half the resamples define it. Deterministic for a seed.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(y_true) != len(probs):
        raise ValueError(
            f"need labels (N,) and probabilities (N, C); got {y_true.shape}, {probs.shape}"
        )
    if len(y_true) and not (0 <= y_true.min() and y_true.max() < probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1} to match the probabilities")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if len(y_true) == 0 or n_resamples < 1:
        return {name: None for name in SCALARS}

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y_true, return_counts=True)
    members = [np.flatnonzero(y_true == c) for c in classes]
    # Resampled columns are grouped by true class, so the label of each column is the same in
    # every resample and only the predictions and scores move.
    y_grouped = np.repeat(classes, counts)
    per_resample = len(y_true) * probs.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // per_resample)
    values = {name: [] for name in SCALARS}
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        index = np.concatenate(
            [m[rng.integers(0, len(m), size=(size, len(m)))] for m in members], axis=1
        )
        for name, batch in _batch_metrics(y_grouped, probs, index).items():
            values[name].append(batch)

    tail = (1 - confidence) / 2
    intervals: dict[str, tuple[float, float] | None] = {}
    for name in SCALARS:
        samples = np.concatenate(values[name])
        samples = samples[np.isfinite(samples)]
        if len(samples) < MIN_VALID_FRACTION * n_resamples:
            intervals[name] = None
        else:
            low, high = np.quantile(samples, [tail, 1 - tail])
            intervals[name] = (float(low), float(high))
    return intervals


def _batch_metrics(
    y_true: np.ndarray, probs: np.ndarray, index: np.ndarray
) -> dict[str, np.ndarray]:
    """`classification_metrics` scalars for many resamples at once, NaN where undefined.

    `index` (B, N) picks rows of `probs`; column j of every resample has true label y_true[j].
    """
    resamples, n = index.shape
    num_classes = probs.shape[1]
    binary = num_classes == 2
    predicted = probs.argmax(axis=1)[index]
    cells = num_classes * num_classes
    codes = np.arange(resamples)[:, None] * cells + y_true[None, :] * num_classes + predicted
    confusion = np.bincount(codes.ravel(), minlength=resamples * cells).reshape(
        resamples, num_classes, num_classes
    )
    tp = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
    support = confusion.sum(axis=2).astype(np.float64)
    predicted_count = confusion.sum(axis=1).astype(np.float64)
    fp = predicted_count - tp
    tn = n - support - fp
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # A resample where no class defines specificity averages nothing; NaN marks it undefined.
        warnings.simplefilter("ignore", RuntimeWarning)
        # zero_division=0 for precision, recall and F1, as classification_metrics asks sklearn.
        precision = np.where(predicted_count > 0, tp / predicted_count, 0.0)
        recall_or_zero = np.where(support > 0, tp / support, 0.0)
        f1_denominator = support + predicted_count
        f1 = np.where(f1_denominator > 0, 2 * tp / f1_denominator, 0.0)
        specificity = tn / (tn + fp)
        # sklearn's balanced accuracy averages recall over the classes that occur in the truth.
        recall_nan = np.where(support > 0, tp / support, np.nan)
        balanced = np.nanmean(recall_nan, axis=1)

        if binary:
            result = {
                "precision": precision[:, 1],
                "recall": recall_or_zero[:, 1],
                "specificity": specificity[:, 1],
                "f1": f1[:, 1],
            }
        else:
            occurring = (support > 0) | (predicted_count > 0)
            count = occurring.sum(axis=1)
            result = {
                "precision": np.where(occurring, precision, 0).sum(axis=1) / count,
                "recall": np.where(occurring, recall_or_zero, 0).sum(axis=1) / count,
                "specificity": np.nanmean(np.where(occurring, specificity, np.nan), axis=1),
                "f1": np.where(occurring, f1, 0).sum(axis=1) / count,
            }
    result["accuracy"] = tp.sum(axis=1) / n
    result["balanced_accuracy"] = balanced
    result["auc"] = _batch_auc(y_true, probs, index)
    return {name: result[name] for name in SCALARS}


def _batch_auc(y_true: np.ndarray, probs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """ROC AUC as the Mann-Whitney U of positive against negative scores, divided by their pairs;
    one-vs-rest macro over the classes present for multi-class, like `metrics._auc`."""
    present = np.unique(y_true)
    if len(present) < 2:
        return np.full(len(index), np.nan)
    scored = [1] if probs.shape[1] == 2 else present
    aucs = []
    for c in scored:
        positive = y_true == c
        scores = probs[index, c]
        u = stats.mannwhitneyu(
            scores[:, positive], scores[:, ~positive], axis=1, method="asymptotic",
            use_continuity=False,
        ).statistic
        aucs.append(u / (positive.sum() * (~positive).sum()))
    return np.mean(aucs, axis=0)


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Score threshold maximising Youden's J = sensitivity + specificity - 1 (TPR - FPR).

    Meant for validation data; the threshold is then applied unchanged to the test set. Call an
    example positive when its score >= threshold (sklearn's roc_curve convention). Among equally
    good thresholds the highest (most specific) wins. None when the labels hold one class only.
    """
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return None
    fpr, tpr, thresholds = skm.roc_curve(y_true, np.asarray(scores, dtype=np.float64))
    # The first threshold is +inf (nothing called positive), never a usable operating point.
    best = np.argmax(tpr[1:] - fpr[1:]) + 1
    return float(thresholds[best])


def at_threshold(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Binary operating point: an example is positive when its score >= threshold.

    Sensitivity and specificity are None when the data hold no positives / no negatives;
    precision and F1 follow `classification_metrics` (0 when nothing is called positive).
    """
    y_true = np.asarray(y_true).astype(np.int64)
    predicted = (np.asarray(scores, dtype=np.float64) >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = skm.confusion_matrix(y_true, predicted, labels=[0, 1])
    return {
        "threshold": float(threshold),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "precision": float(skm.precision_score(y_true, predicted, labels=[0, 1], zero_division=0)),
        "f1": float(skm.f1_score(y_true, predicted, labels=[0, 1], zero_division=0)),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean and sample standard deviation (ddof=1) of the defined values (None and NaN skipped)."""
    kept = _defined(values)
    return {
        "mean": float(np.mean(kept)) if len(kept) else None,
        "std": float(np.std(kept, ddof=1)) if len(kept) >= 2 else None,
        "n": int(len(kept)),
    }


def paired_comparison(
    a: Sequence[float | None],
    b: Sequence[float | None],
    *,
    label_a: str,
    label_b: str,
    metric: str = "AUC",
    unit: str = "pairs",
) -> dict:
    """Compare mode A with mode B on paired values (e.g. AUC per site x seed, same order in both).

    Pairs where either value is None or NaN are dropped and counted. Reports wins/ties/losses of
    A, the mean difference A - B, the Wilcoxon signed-rank and paired t-test p-values, Cohen's d_z
    and the matched-pairs rank-biserial correlation, a `note` on anything undefined or
    underpowered, and a one-line `sentence` for the report.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    x, y = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)  # None becomes NaN
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    difference = x - y
    n = len(difference)
    nonzero = difference[difference != 0]
    notes = []
    if n < len(keep):
        notes.append(f"{len(keep) - n} of {len(keep)} pairs dropped for a missing or "
                     f"not-estimable value")

    wilcoxon_p = ttest_p = cohens_dz = rank_biserial = None
    if n < 2:
        notes.append(f"{n} complete pair{'s' if n != 1 else ''}: too few for a paired test")
    elif len(nonzero) == 0:
        notes.append("all differences are zero: no test or effect size applies")
    else:
        wilcoxon_p = float(stats.wilcoxon(difference).pvalue)
        if len(nonzero) < WILCOXON_MIN_FOR_005:
            notes.append(
                f"only {len(nonzero)} non-zero differences: the Wilcoxon test cannot reach "
                f"p < 0.05 with fewer than {WILCOXON_MIN_FOR_005}"
            )
        ranks = stats.rankdata(np.abs(nonzero))
        rank_biserial = float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())
        spread = float(np.std(difference, ddof=1))
        if spread == 0:
            notes.append("every difference is the same: paired t-test and d_z undefined")
        else:
            ttest_p = float(stats.ttest_rel(x, y).pvalue)
            cohens_dz = float(np.mean(difference) / spread)

    summary_a, summary_b = mean_std(x), mean_std(y)
    result = {
        "label_a": label_a,
        "label_b": label_b,
        "metric": metric,
        "n": n,
        "n_dropped": int(len(keep) - n),
        "mean_a": summary_a["mean"],
        "std_a": summary_a["std"],
        "mean_b": summary_b["mean"],
        "std_b": summary_b["std"],
        "mean_difference": float(np.mean(difference)) if n else None,
        "wins": int((difference > 0).sum()),
        "ties": int((difference == 0).sum()),
        "losses": int((difference < 0).sum()),
        "wilcoxon_p": wilcoxon_p,
        "ttest_p": ttest_p,
        "cohens_dz": cohens_dz,
        "rank_biserial": rank_biserial,
        "note": "; ".join(notes) or None,
    }
    result["sentence"] = _sentence(result, unit)
    return result


def _sentence(result: dict, unit: str) -> str:
    a, b, metric = result["label_a"], result["label_b"], result["metric"]
    if result["n"] == 0:
        return f"no {unit} where both {a} and {b} have {metric} values"
    details = []
    if result["ties"]:
        details.append(f"{result['ties']} tied")
    details.append(f"mean {metric} {result['mean_difference']:+.3f}")
    tests = [
        f"Wilcoxon p {format_p(result['wilcoxon_p'])}",
        f"paired t p {format_p(result['ttest_p'])}",
        "d_z n/a" if result["cohens_dz"] is None else f"d_z = {result['cohens_dz']:.2f}",
    ]
    return (f"{a} beats {b} at {result['wins']} of {result['n']} {unit} "
            f"({'; '.join(details)}; {', '.join(tests)})")


def format_p(p: float | None) -> str:
    """"= 0.031", "< 0.001" or "n/a": one way of writing p everywhere in the report."""
    if p is None:
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    text = f"{p:.2g}"
    # Two significant digits would print 0.0496 as "0.05" and hide that it is below 0.05.
    if p < 0.05 <= float(text):
        text = f"{p:.3g}"
    return f"= {text}"


def _defined(values: Sequence[float | None]) -> np.ndarray:
    numbers = np.array(values, dtype=np.float64)  # None becomes NaN
    return numbers[np.isfinite(numbers)]
