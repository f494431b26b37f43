"""Seeded non-IID partitioners of a pooled dataset across simulated sites."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.errors import MedfedError
from medfed.simulations.partition import partition

SCHEMES = ("iid", "dirichlet", "quantity", "pathological")
SITES = 5


def _parts(labels, scheme, *, seed=0, sites=SITES, alpha=0.5, labels_per_site=1, **kwargs):
    return partition(labels, scheme=scheme, sites=sites, alpha=alpha,
                     labels_per_site=labels_per_site, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def synthetic_labels() -> np.ndarray:
    """3000 labels over 5 classes with unequal class sizes."""
    rng = np.random.default_rng(123)
    return rng.choice(5, size=3000, p=[0.35, 0.25, 0.2, 0.12, 0.08]).astype(np.int64)


@pytest.fixture(params=["pneumonia", "synthetic"])
def labels(request, synthetic_labels):
    if request.param == "pneumonia":
        return request.getfixturevalue("pneumonia_labels")
    return synthetic_labels


def _positive_fraction_spread(labels, parts) -> float:
    """Std over non-empty sites of the fraction of class-1 examples."""
    fractions = [labels[p].mean() for p in parts if len(p)]
    return float(np.std(fractions))


def _label_skew(labels, parts) -> float:
    """Mean total-variation distance between each non-empty site's label mix and the global one."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = [
        0.5 * np.abs(np.array([(labels[p] == c).mean() for c in classes]) - overall).sum()
        for p in parts if len(p)
    ]
    return float(np.mean(distances))


# --- every scheme ------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_parts_are_disjoint_and_cover_everything(labels, scheme):
    parts = _parts(labels, scheme, sites=SITES if scheme != "pathological" else 6)
    assert len(parts) == (SITES if scheme != "pathological" else 6)
    for part in parts:
        assert part.dtype.kind == "i"
        assert np.all(np.diff(part) > 0)  # sorted, no repeats within a site
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_parts_other_seed_differs(labels, scheme):
    sites = 10 if scheme == "pathological" else SITES
    first = _parts(labels, scheme, seed=3, sites=sites)
    again = _parts(labels, scheme, seed=3, sites=sites)
    other = _parts(labels, scheme, seed=4, sites=sites)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_unknown_scheme(synthetic_labels):
    with pytest.raises(MedfedError, match="shards"):
        _parts(synthetic_labels, "shards")


# --- iid ---------------------------------------------------------------------------------------

def test_iid_sizes_equal_and_labels_near_global(pneumonia_labels):
    parts = _parts(pneumonia_labels, "iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    overall = pneumonia_labels.mean()
    for part in parts:
        assert abs(pneumonia_labels[part].mean() - overall) < 0.05


# --- dirichlet ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_small_alpha_skews_labels(pneumonia_labels, seed):
    skewed = _positive_fraction_spread(
        pneumonia_labels, _parts(pneumonia_labels, "dirichlet", alpha=0.1, seed=seed))
    uniform = _positive_fraction_spread(pneumonia_labels,
                                        _parts(pneumonia_labels, "iid", seed=seed))
    # Observed: iid spread 0.007..0.025, dirichlet(0.1) spread 0.385..0.454 for seeds 0-4.
    assert uniform < 0.04
    assert skewed > 0.2
    assert skewed > 8 * uniform


@pytest.mark.parametrize("seed", range(3))
def test_dirichlet_small_alpha_skews_multiclass(synthetic_labels, seed):
    skewed = _label_skew(synthetic_labels,
                         _parts(synthetic_labels, "dirichlet", alpha=0.1, seed=seed))
    mild = _label_skew(synthetic_labels,
                       _parts(synthetic_labels, "dirichlet", alpha=100.0, seed=seed))
    uniform = _label_skew(synthetic_labels, _parts(synthetic_labels, "iid", seed=seed))
    assert uniform < 0.05
    assert mild < 0.1
    assert skewed > 0.3
    assert skewed > 5 * max(uniform, mild)


# --- quantity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_quantity_small_alpha_unequal_sizes_iid_labels(pneumonia_labels, seed):
    parts = _parts(pneumonia_labels, "quantity", alpha=0.3, seed=seed)
    sizes = np.array([len(p) for p in parts])
    # Sizes vary a lot (coefficient of variation) where iid gives equal sizes.
    assert sizes.std() / sizes.mean() > 0.4
    assert sizes.max() > 2 * np.median(sizes)
    overall = pneumonia_labels.mean()
    checked = 0
    for part in parts:
        if len(part) >= 200:  # tiny sites are too noisy to compare
            assert abs(pneumonia_labels[part].mean() - overall) < 0.06
            checked += 1
    assert checked >= 1


def test_quantity_large_alpha_nearly_equal(pneumonia_labels):
    sizes = np.array([len(p) for p in _parts(pneumonia_labels, "quantity", alpha=1000.0)])
    assert sizes.std() / sizes.mean() < 0.1


# --- redrawing until every site has its minimum -----------------------------------------------

@pytest.mark.parametrize("scheme, seed", [("dirichlet", 1), ("dirichlet", 2), ("quantity", 3)])
def test_min_size_redraws_small_sites(pneumonia_labels, scheme, seed):
    alpha = 0.1 if scheme == "dirichlet" else 0.3
    first = _parts(pneumonia_labels, scheme, alpha=alpha, seed=seed)
    assert min(len(p) for p in first) < 40  # this seed's first draw has a tiny site
    parts = _parts(pneumonia_labels, scheme, alpha=alpha, seed=seed, min_size=40)
    assert min(len(p) for p in parts) >= 40
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(pneumonia_labels)))
    again = _parts(pneumonia_labels, scheme, alpha=alpha, seed=seed, min_size=40)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_min_size_zero_is_the_first_draw(pneumonia_labels):
    default = _parts(pneumonia_labels, "dirichlet", alpha=0.1, seed=1)
    explicit = _parts(pneumonia_labels, "dirichlet", alpha=0.1, seed=1, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(default, explicit))


def test_min_size_unreachable_returns_a_partition(synthetic_labels):
    # 3000 examples cannot give 5 sites 1000 each: after the attempts the last draw comes back.
    parts = _parts(synthetic_labels, "dirichlet", alpha=0.5, min_size=1000, attempts=3)
    assert len(parts) == SITES
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(synthetic_labels)))


# --- pathological ------------------------------------------------------------------------------

@pytest.mark.parametrize("sites", [2, 5, 7])
def test_pathological_one_label_per_site_binary(pneumonia_labels, sites):
    parts = _parts(pneumonia_labels, "pathological", sites=sites, labels_per_site=1)
    held = [set(np.unique(pneumonia_labels[p]).tolist()) for p in parts]
    assert all(len(h) == 1 for h in held)
    assert set().union(*held) == {0, 1}


@pytest.mark.parametrize("sites", [5, 10, 12])
def test_pathological_one_label_per_site_multiclass(synthetic_labels, sites):
    parts = _parts(synthetic_labels, "pathological", sites=sites, labels_per_site=1)
    held = [set(np.unique(synthetic_labels[p]).tolist()) for p in parts]
    assert all(len(h) == 1 for h in held)
    assert set().union(*held) == set(range(5))
    if sites == 5:
        # One site per class: each site has the whole class.
        for part, classes in zip(parts, held):
            (cls,) = classes
            assert len(part) == int((synthetic_labels == cls).sum())


def test_pathological_two_labels_per_site(synthetic_labels):
    parts = _parts(synthetic_labels, "pathological", sites=5, labels_per_site=2)
    held = [set(np.unique(synthetic_labels[p]).tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(5))


def test_pathological_splits_a_class_evenly_among_holders(synthetic_labels):
    parts = _parts(synthetic_labels, "pathological", sites=10, labels_per_site=1)
    for cls in range(5):
        sizes = [len(p) for p in parts if len(p) and synthetic_labels[p[0]] == cls]
        assert len(sizes) == 2
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("sites, labels_per_site, fragment", [
    (4, 1, "cannot cover 5 classes"),   # too few sites for the classes
    (2, 2, "cannot cover 5 classes"),
    (5, 6, "labels_per_site=6"),        # more labels per site than classes
])
def test_pathological_impossible_settings(synthetic_labels, sites, labels_per_site, fragment):
    with pytest.raises(MedfedError, match=fragment):
        _parts(synthetic_labels, "pathological", sites=sites, labels_per_site=labels_per_site)


def test_pathological_impossible_binary(pneumonia_labels):
    with pytest.raises(MedfedError, match="2 classes"):
        _parts(pneumonia_labels, "pathological", sites=5, labels_per_site=3)
