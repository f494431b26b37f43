"""A site's train/validation/test split, the same at a simulated site and at a hospital.

Without patient ids the split is stratified 70/15/15 by example. With patient ids it is
group-aware: every image of one patient lands on one side (scikit-learn's StratifiedGroupKFold
with 7 folds: one fold test, one validation, five train, i.e. about 71/14/14), because two
images of one patient on both sides of a split let a model recognise the patient instead of the
disease and inflate every test metric.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import (
    GroupShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)

from medfed.common.errors import MedfedError

SITE_SPLIT = {"train": 0.70, "val": 0.15, "test": 0.15}
GROUP_FOLDS = 7


def split_indices(labels: np.ndarray, *, seed: int, groups: np.ndarray | None = None,
                  site: str = "site", fold: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Positions into `labels` for train/val/test.

    `fold=(i, k)` is k-fold cross-validation: fold i of k (stratified, by patient when `groups`
    are given) is the test split, and validation is carved from the rest the usual way."""
    labels = np.asarray(labels)
    groups = None if groups is None else np.asarray(groups)
    if fold is not None:
        return _kfold(labels, groups, seed=seed, site=site, fold=fold)
    if groups is None:
        return _stratified(labels, seed=seed)
    return _grouped(labels, groups, seed=seed, site=site)


def _kfold(labels: np.ndarray, groups: np.ndarray | None, *, seed: int, site: str,
           fold: tuple[int, int]) -> dict[str, np.ndarray]:
    index, folds = fold
    members = len(np.unique(groups)) if groups is not None else int(np.bincount(labels).min())
    if members < folds:
        unit = "patients" if groups is not None else "images in its smallest class"
        raise MedfedError(f"{site} has {members} {unit}; {folds}-fold cross-validation needs at "
                          f"least {folds}. Use fewer --folds")
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        test = list(splitter.split(np.zeros(len(labels)), labels))[index][1]
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        test = list(splitter.split(np.zeros(len(labels)), labels, groups))[index][1]
    rest = np.setdiff1d(np.arange(len(labels)), test)
    # Validation takes the same share of what is left as in the plain split (15 of 85).
    share = SITE_SPLIT["val"] / (SITE_SPLIT["train"] + SITE_SPLIT["val"])
    if groups is None:
        try:
            train, val = train_test_split(rest, test_size=share, random_state=seed, stratify=labels[rest])
        except ValueError:
            train, val = train_test_split(rest, test_size=share, random_state=seed)
    else:
        inner = GroupShuffleSplit(n_splits=1, test_size=share, random_state=seed)
        train_pos, val_pos = next(inner.split(rest, labels[rest], groups[rest]))
        train, val = rest[train_pos], rest[val_pos]
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def subsample(labels: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """A stratified `fraction` of positions, at least one per class present (data-efficiency study)."""
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    size = max(int(round(fraction * len(labels))), len(np.unique(labels)))
    try:
        kept, _ = train_test_split(np.arange(len(labels)), train_size=size, random_state=seed,
                                   stratify=labels)
    except ValueError:
        kept, _ = train_test_split(np.arange(len(labels)), train_size=size, random_state=seed)
    # Stratified rounding can drop a rare class from a tiny subset; put one example back.
    rng = np.random.default_rng(seed)
    missing = [rng.choice(np.flatnonzero(labels == c)) for c in np.setdiff1d(labels, labels[kept])]
    return np.sort(np.concatenate([kept, np.asarray(missing, dtype=kept.dtype)]))


def _stratified(labels: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    index = np.arange(len(labels))

    def cut(idx, lab, size):
        # A class too rare to stratify falls back to a plain random split rather than refusing.
        try:
            return train_test_split(idx, lab, test_size=size, random_state=seed, stratify=lab)
        except ValueError:
            return train_test_split(idx, lab, test_size=size, random_state=seed)

    held_out = SITE_SPLIT["val"] + SITE_SPLIT["test"]
    train, rest, _, rest_labels = cut(index, labels, held_out)
    val, test, _, _ = cut(rest, rest_labels, SITE_SPLIT["test"] / held_out)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _grouped(labels: np.ndarray, groups: np.ndarray, *, seed: int, site: str) -> dict[str, np.ndarray]:
    patients = len(np.unique(groups))
    if patients < GROUP_FOLDS:
        raise MedfedError(
            f"{site} has images of only {patients} patients; a patient-level train/val/test split "
            f"needs at least {GROUP_FOLDS}. Add data, or drop the patient_id column if every "
            f"image really is a different patient"
        )
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=GROUP_FOLDS, shuffle=True, random_state=seed)
    for fold, (_, members) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[members] = fold
    return {
        "train": np.flatnonzero(folds >= 2),
        "val": np.flatnonzero(folds == 1),
        "test": np.flatnonzero(folds == 0),
    }
