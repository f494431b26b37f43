"""A site's train/val/test split: stratified by example, or group-aware by patient."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.errors import MedfedError
from medfed.common.splits import SITE_SPLIT, split_indices, subsample
from medfed.simulations.partition import partition


@pytest.fixture(scope="module")
def synthetic_labels() -> np.ndarray:
    """3000 labels over 5 classes with unequal class sizes."""
    rng = np.random.default_rng(123)
    return rng.choice(5, size=3000, p=[0.35, 0.25, 0.2, 0.12, 0.08]).astype(np.int64)


def _site(labels, *, seed=0, site=0, scheme="iid", alpha=0.5):
    return partition(labels, scheme=scheme, sites=5, alpha=alpha, labels_per_site=1, seed=seed)[site]


def _split_site(index, labels, *, seed, groups=None):
    """Split one site's examples and map the positions back to dataset indices."""
    positions = split_indices(labels[index], seed=seed,
                              groups=None if groups is None else groups[index])
    return {name: index[p] for name, p in positions.items()}


def _check_split(index, labels, splits, *, tolerance, size_tolerance=0.02):
    parts = [splits["train"], splits["val"], splits["test"]]
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.sort(index))
    assert len(np.unique(joined)) == len(joined)
    n = len(index)
    for name, part in zip(("train", "val", "test"), parts):
        assert abs(len(part) / n - SITE_SPLIT[name]) < size_tolerance, (name, len(part), n)
        for cls in np.unique(labels[index]):
            site_fraction = (labels[index] == cls).mean()
            assert abs((labels[part] == cls).mean() - site_fraction) < tolerance, (name, cls)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_stratified(pneumonia_labels, seed):
    index = _site(pneumonia_labels, scheme="dirichlet", alpha=1.0, seed=seed)
    assert len(index) > 300
    _check_split(index, pneumonia_labels, _split_site(index, pneumonia_labels, seed=seed),
                 tolerance=0.02)


def test_multiclass_stratified(synthetic_labels):
    index = _site(synthetic_labels)
    _check_split(index, synthetic_labels, _split_site(index, synthetic_labels, seed=0),
                 tolerance=0.03)


def test_deterministic(pneumonia_labels):
    index = _site(pneumonia_labels, site=1)
    first = _split_site(index, pneumonia_labels, seed=5)
    again = _split_site(index, pneumonia_labels, seed=5)
    other = _split_site(index, pneumonia_labels, seed=6)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["test"], other["test"])


def test_rare_class_falls_back(synthetic_labels):
    """A class with a single example cannot be stratified; the split still covers the site."""
    zeros = np.flatnonzero(synthetic_labels == 0)[:59]
    lone_one = np.flatnonzero(synthetic_labels == 1)[:1]
    index = np.sort(np.concatenate([zeros, lone_one]))
    splits = _split_site(index, synthetic_labels, seed=0)
    joined = np.concatenate([splits["train"], splits["val"], splits["test"]])
    np.testing.assert_array_equal(np.sort(joined), index)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [42, 9, 9]


# --- group-aware ---------------------------------------------------------------------------------

def _patients(count: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 1-6 images each; a patient's images share the patient's label."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 7, size=count)
    patient_labels = (rng.random(count) < 0.3).astype(np.int64)
    groups = np.repeat(np.arange(count), per_patient)
    return np.repeat(patient_labels, per_patient), np.array([f"P{g:04d}" for g in groups])


@pytest.mark.parametrize("seed", [0, 3])
def test_group_aware_never_splits_a_patient(seed):
    labels, groups = _patients(400, seed=seed)
    splits = split_indices(labels, seed=seed, groups=groups)
    sides = [set(groups[splits[name]]) for name in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    index = np.arange(len(labels))
    # Seven folds give 5/7, 1/7, 1/7 of the patients: close to 70/15/15 by images and class mix.
    _check_split(index, labels, splits, tolerance=0.05, size_tolerance=0.05)


def test_group_aware_differs_from_example_split():
    """The same data split by example would put patients on both sides: the guard is needed."""
    labels, groups = _patients(400)
    by_example = split_indices(labels, seed=0)
    shared = set(groups[by_example["train"]]) & set(groups[by_example["test"]])
    assert shared


def test_too_few_patients_is_refused():
    labels = np.array([0, 1] * 10)
    groups = np.array([f"P{i % 4}" for i in range(20)])
    with pytest.raises(MedfedError, match="only 4 patients.*at least 7"):
        split_indices(labels, seed=0, groups=groups, site="hospital-a")


# --- k-fold cross-validation and subsampling -----------------------------------------------------

@pytest.mark.parametrize("grouped", [False, True])
def test_kfold_test_folds_partition_the_site(grouped):
    labels, groups = _patients(300, seed=2)
    groups = groups if grouped else None
    tests = []
    for i in range(5):
        split = split_indices(labels, seed=0, groups=groups, fold=(i, 5))
        joined = np.concatenate([split["train"], split["val"], split["test"]])
        np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))
        if grouped:
            assert not set(groups[split["train"]]) & set(groups[split["test"]])
            assert not set(groups[split["train"]]) & set(groups[split["val"]])
        tests.append(split["test"])
    # Every example is tested exactly once over the k folds.
    np.testing.assert_array_equal(np.sort(np.concatenate(tests)), np.arange(len(labels)))


def test_kfold_needs_enough_examples():
    with pytest.raises(MedfedError, match="5-fold cross-validation needs at least 5"):
        split_indices(np.array([0, 0, 0, 1, 1, 1, 1, 1]), seed=0, fold=(0, 5), site="site-1")


def test_subsample_is_stratified():
    labels = np.array([0] * 900 + [1] * 100)
    tenth = subsample(labels, fraction=0.1, seed=0)
    assert len(tenth) == 100 and np.bincount(labels[tenth]).tolist() == [90, 10]
    assert len(subsample(labels, fraction=1.0, seed=0)) == 1000
    assert len(np.unique(labels[subsample(labels, fraction=0.001, seed=0)])) == 2
