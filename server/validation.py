"""What a site's training reply must be before it may touch the global model.

A reply is held against the round it answers: the global arrays the server sent (their keys, shapes
and dtypes), the study's sites, the training examples each site declared earlier, and — in a
deployment — the registry of which Flower node is which hospital. A reply that fails any check is
rejected with the site and a one-line reason, and the round goes on with the rest: one broken or
hostile site must neither end the run nor steer the aggregate.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from medfed.common.dataset import SPLITS
from medfed.common.messages import (
    CLASS_SUMS, COMPUTE_SECONDS, EVALUATED_SPLITS, EVALUATION, PEAK_MB, PRIVACY, PRIVACY_METRICS, TRAIN_LOSS,
    TRAIN_SECONDS, WEIGHT_KEY, declared_name,
)
from medfed.common.metrics import SCALARS

TRAIN_METRICS = frozenset({WEIGHT_KEY, TRAIN_LOSS})
# What the round cost the site, reported when measured (common/messages.train_metrics).
COST_METRICS = frozenset({COMPUTE_SECONDS, TRAIN_SECONDS, PEAK_MB})
# An evaluation reply's one MetricRecord, as sites send it (common/messages.evaluation_metrics):
# Flower averages it across sites (and ends the run when the replies' keys differ), the report
# reads its confusion matrices and histograms back (messages.split_metrics, label_histograms).
EVALUATION_METRICS = frozenset({
    WEIGHT_KEY,
    *(f"{split}-{name}" for split in EVALUATED_SPLITS for name in (*SCALARS, "loss", "confusion")),
    *(f"{split}-histogram" for split in SPLITS),
})
# Names a reply may list in one line: a rejection reason stays readable whatever the site sent.
SHOWN = 3


@dataclass(frozen=True, kw_only=True)
class RoundReference:
    """What one round's training replies are held against."""

    arrays: Mapping[str, np.ndarray]  # the global arrays sent this round
    sites: Collection[str]  # the study's sites, by name
    max_examples: int  # federation.max_examples: the cap on any site's num-examples
    norm_factor: float  # federation.norm_factor
    num_classes: int  # the study's classes (a reply's evaluation counts per class)
    declared: Mapping[str, int] = field(default_factory=dict)  # training examples declared earlier
    registry: Mapping[int, str] | None = None  # Flower node id -> registered site (deployment)
    private: bool = False  # DP-SGD at the sites: every reply carries its privacy record


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str

    def __str__(self) -> str:
        return f"{self.site}: {self.reason}"


def screen(replies: Sequence[tuple[str, Message]], reference: RoundReference
           ) -> tuple[list[tuple[str, Message]], list[Rejection]]:
    """Split a round's (site name, reply) pairs, error replies left out by the caller, into those
    fit to aggregate and the rejections."""
    kept, rejected = _sort(replies, reference, lambda name, reply: content_problem(
        reply.content, reference, declared=reference.declared.get(name)))
    outliers = norm_outliers(
        {name: update_norm(reply.content["arrays"], reference.arrays) for name, reply in kept},
        factor=reference.norm_factor,
    )
    rejected += [Rejection(name, outliers[name]) for name, _ in kept if name in outliers]
    return [(name, reply) for name, reply in kept if name not in outliers], rejected


def screen_evaluation(replies: Sequence[tuple[str, Message]], *, sites: Collection[str],
                      num_classes: int, max_examples: int, registry: Mapping[int, str] | None = None
                      ) -> tuple[list[tuple[str, Message]], list[Rejection]]:
    """Split a round's (site name, evaluation reply) pairs, error replies left out by the caller,
    into those the aggregate and the report can read and the rejections: the same identity rules
    as training replies, and the metric record `evaluation_problem` accepts."""
    reference = RoundReference(arrays={}, sites=sites, max_examples=max_examples, norm_factor=0.0,
                               num_classes=num_classes, registry=registry)
    return _sort(replies, reference, lambda name, reply: evaluation_problem(
        reply.content, num_classes=num_classes, cap=max_examples))


def _sort(replies: Sequence[tuple[str, Message]], reference: RoundReference, problem
          ) -> tuple[list[tuple[str, Message]], list[Rejection]]:
    """(kept, rejected): the identity rules first, then `problem(name, reply)` on the content."""
    counts = Counter(name for name, _ in replies)
    kept, rejected = [], []
    for name, reply in replies:
        reason = (identity_problem(name, reply, reference) or _repeated(counts[name])
                  or problem(name, reply))
        if reason:
            rejected.append(Rejection(name, reason))
        else:
            kept.append((name, reply))
    return kept, rejected


def _repeated(count: int) -> str | None:
    # Two replies under one name cannot both be genuine and neither can be told apart: keeping
    # one would let whoever answers first speak for the hospital.
    return f"{count} replies under this name this round; all rejected" if count > 1 else None


def identity_problem(name: str, reply: Message, reference: RoundReference) -> str | None:
    node = reply.metadata.src_node_id
    if reference.registry is not None:
        if node not in reference.registry:
            return "not a registered node"
        claimed = declared_name(reply)
        if claimed != reference.registry[node]:
            said = "gives no site name" if claimed is None else f"calls itself {claimed!r}"
            return f"{said}, but node {node} is registered as {reference.registry[node]!r}"
    if name not in reference.sites:
        return f"{name!r} is not a site of this study"
    return None


def content_problem(content: RecordDict, reference: RoundReference, *,
                    declared: int | None) -> str | None:
    """What is wrong with a reply's records, metrics and arrays, if anything."""
    records = {"metrics", EVALUATION, *([PRIVACY] if reference.private else [])}
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != records:
        return (f"expected one ArrayRecord 'arrays' and MetricRecords {_names(records)}, got "
                f"{_names(content.array_records)} and {_names(content.metric_records)}")
    if reference.private and (problem := privacy_problem(content.metric_records[PRIVACY])):
        return f"its privacy record: {problem}"
    metrics = content.metric_records["metrics"]
    if problem := key_problem("metrics", got=set(metrics) - COST_METRICS, expected=TRAIN_METRICS):
        return problem
    for key in COST_METRICS & set(metrics):
        if not _finite_number(metrics[key]) or float(metrics[key]) < 0:
            return f"{key} is {metrics[key]!r}, not a finite number of 0 or more"
    loss = metrics[TRAIN_LOSS]
    if not _finite_number(loss):
        return f"{TRAIN_LOSS} is {loss!r}, not a finite number"
    if problem := examples_problem(metrics[WEIGHT_KEY], declared=declared, cap=reference.max_examples):
        return problem
    evaluation = RecordDict({"metrics": content.metric_records[EVALUATION]})
    if problem := evaluation_problem(evaluation, num_classes=reference.num_classes,
                                     cap=reference.max_examples):
        return f"its evaluation of the model it received: {problem}"
    arrays = content.array_records["arrays"]
    if problem := key_problem("arrays", got=set(arrays), expected=set(reference.arrays)):
        return problem
    for key, expected in reference.arrays.items():
        # The bytes come from outside: whatever makes them undecodable rejects the reply, not the run.
        try:
            value = arrays[key].numpy()
        except Exception as exc:
            return f"array '{key}' cannot be decoded ({type(exc).__name__})"
        if not isinstance(value, np.ndarray):
            return f"array '{key}' is not a numpy array"
        if value.dtype != expected.dtype:
            return f"array '{key}' has dtype {value.dtype}, expected {expected.dtype}"
        if value.shape != expected.shape:
            return f"array '{key}' has shape {value.shape}, expected {expected.shape}"
        if not np.isfinite(value).all():
            return f"array '{key}' holds {'NaN' if np.isnan(value).any() else 'Inf'}"
    return None


def privacy_problem(spend) -> str | None:
    """What is wrong with a site's privacy record (common/privacy.Ledger.metrics), if anything."""
    if problem := key_problem(PRIVACY, got=set(spend), expected=set(PRIVACY_METRICS)):
        return problem
    for key in PRIVACY_METRICS:
        value = spend[key]
        if key == "budget" and isinstance(value, float) and math.isnan(value):
            continue  # no budget: a noise multiplier was given instead
        if not _finite_number(value) or float(value) < 0:
            return f"{key} is {value!r}, not a finite number of 0 or more"
    return None


def evaluation_problem(content: RecordDict, *, num_classes: int, cap: int) -> str | None:
    """What is wrong with an evaluation reply's metric record, if anything: its keys, a scalar
    that is not a rate in [0, 1] (NaN where undefined) or a loss >= 0, a confusion matrix or label
    histogram of the wrong length or with values that are not counts, a matrix whose rows do not
    add up to the split's histogram, or `num-examples` other than the validation split's size."""
    if set(content.metric_records) != {"metrics"}:
        return f"expected one MetricRecord 'metrics', got {_names(content.metric_records)}"
    metrics = content.metric_records["metrics"]
    if problem := key_problem("metrics", got=set(metrics), expected=EVALUATION_METRICS):
        return problem
    if problem := examples_problem(metrics[WEIGHT_KEY], declared=None, cap=cap):
        return problem
    for split in EVALUATED_SPLITS:
        for name in (*SCALARS, "loss"):
            if problem := _score_problem(f"{split}-{name}", metrics[f"{split}-{name}"],
                                         rate=name != "loss"):
                return problem
    histograms = {}
    for split in SPLITS:
        key = f"{split}-histogram"
        if problem := _counts_problem(key, metrics[key], length=num_classes, cap=cap):
            return problem
        histograms[split] = list(metrics[key])
    for split in EVALUATED_SPLITS:
        key = f"{split}-confusion"
        if problem := _counts_problem(key, metrics[key], length=num_classes ** 2, cap=cap):
            return problem
        matrix = list(metrics[key])
        rows = [sum(matrix[i * num_classes:(i + 1) * num_classes]) for i in range(num_classes)]
        if rows != histograms[split]:
            return (f"{key} counts {rows} examples per true class, but {split}-histogram "
                    f"says {histograms[split]}")
    if metrics[WEIGHT_KEY] != sum(histograms["val"]):
        return (f"{WEIGHT_KEY} is {metrics[WEIGHT_KEY]!r}, but val-histogram counts "
                f"{sum(histograms['val'])} validation examples")
    return None


def class_sums_of(reply: Message, *, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A statistics reply's per-class feature sums and counts (for the head's start), the sums
    of `shape` (classes, features), as the classifier's weight; ValueError saying what is wrong
    with them otherwise."""
    record = reply.content.array_records.get(CLASS_SUMS)
    if record is None or set(record) != {"sums", "counts"}:
        raise ValueError(f"expected an ArrayRecord '{CLASS_SUMS}' holding 'sums' and 'counts'")
    sums, counts = record["sums"].numpy(), record["counts"].numpy()
    classes, dimension = shape
    if sums.shape != (classes, dimension) or not np.isfinite(sums).all():
        raise ValueError(f"sums must be {classes} x {dimension} finite numbers, got "
                         f"{sums.dtype} {sums.shape}")
    if (counts.shape != (classes,) or counts.dtype.kind not in "iu" or (counts < 0).any()):
        raise ValueError(f"counts must be {classes} whole numbers of 0 or more, got "
                         f"{counts.dtype} {counts.shape}")
    return sums.astype(np.float64), counts.astype(np.int64)


def _score_problem(key: str, value, *, rate: bool) -> str | None:
    wanted = "a rate from 0 to 1 (NaN where undefined)" if rate else "a loss of 0 or more (or NaN)"
    if isinstance(value, list):
        return f"{key} is a list, not {wanted}"
    try:
        number = float(value)
    except OverflowError:
        return f"{key} is too large a number, not {wanted}"
    if math.isnan(number) or (0 <= number <= 1 if rate else 0 <= number < math.inf):
        return None
    return f"{key} is {value!r}, not {wanted}"


def _counts_problem(key: str, value, *, length: int, cap: int) -> str | None:
    if not isinstance(value, list) or len(value) != length:
        got = f"{len(value)} values" if isinstance(value, list) else repr(value)
        return f"{key} must list {length} counts, got {got}"
    if not all(isinstance(v, int) and 0 <= v <= cap for v in value):
        return f"{key} holds a value that is not a whole count from 0 to {cap}"
    return None


def key_problem(what: str, *, got: set[str], expected: Collection[str]) -> str | None:
    missing, extra = set(expected) - got, got - set(expected)
    parts = ([f"missing {what} {_names(missing)}"] if missing else []) + (
        [f"unexpected {what} {_names(extra)}"] if extra else [])
    return "; ".join(parts) or None


def examples_problem(value, *, declared: int | None, cap: int) -> str | None:
    """`num-examples` weighs a site in the average: it must be a plausible count, at most what the
    site declared earlier (`declared`, when known) and at most `cap`."""
    if not _finite_number(value):
        return f"{WEIGHT_KEY} is {value!r}, not a finite number"
    if value != int(value):
        return f"{WEIGHT_KEY} is {value!r}, not a whole number"
    if value <= 0:
        return f"{WEIGHT_KEY} is {value!r}, not positive"
    if declared is not None and value > declared:
        return f"{WEIGHT_KEY} is {value!r}, more than the {declared} training examples it declared"
    if value > cap:
        return f"{WEIGHT_KEY} is {value!r}, more than federation.max_examples={cap}"
    return None


def _finite_number(value) -> bool:
    """A single number that converts to a finite float (a metric may be a list, and an int
    beyond float range, which only a hostile site sends, overflows math.isfinite)."""
    if isinstance(value, list):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def update_norm(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update − global) over every exchanged array."""
    return math.sqrt(sum(
        float(np.sum((arrays[key].numpy().astype(np.float64) - value) ** 2))
        for key, value in reference.items()
    ))


def norm_outliers(norms: Mapping[str, float], *, factor: float) -> dict[str, str]:
    """Sites whose update norm is more than `factor` × the round's median (0: off).

    Only too large an update is refused: a small one pulls the aggregate towards the global model,
    which bounds its harm. Below three replies there is no majority for the median to speak for;
    with a median of 0 (most sites did not move) there is no scale to compare against."""
    if factor <= 0 or len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    if median == 0:
        return {}
    return {
        site: f"update norm {norm:.3g} is more than {factor:g} x the round's median {median:.3g}"
        for site, norm in norms.items() if norm > factor * median
    }


def _names(items: Collection[str]) -> str:
    names = sorted(map(str, items))
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return (", ".join(repr(n) for n in names[:SHOWN]) or "none") + more
