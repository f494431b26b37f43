"""Seeded non-IID partitioners of a pooled dataset across simulated sites.

Each partitioner returns one index array per site; together they are disjoint and cover every
example exactly once.
"""

from __future__ import annotations

import numpy as np

from medfed.common.errors import MedfedError

def iid(labels: np.ndarray, *, sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), sites)]


def dirichlet(labels: np.ndarray, *, sites: int, alpha: float, rng: np.random.Generator
              ) -> list[np.ndarray]:
    """Label skew: each class is spread over sites in Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(sites)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, chunk in enumerate(np.split(members, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def quantity(labels: np.ndarray, *, sites: int, alpha: float, rng: np.random.Generator
             ) -> list[np.ndarray]:
    """Size skew: site sizes follow Dirichlet(alpha) proportions; labels stay IID within a site."""
    shares = rng.dirichlet(np.full(sites, alpha))
    cuts = (np.cumsum(shares)[:-1] * len(labels)).astype(int)
    return [np.sort(part) for part in np.split(rng.permutation(len(labels)), cuts)]


def pathological(labels: np.ndarray, *, sites: int, labels_per_site: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Each site holds `labels_per_site` classes; a class is split evenly among its holders.

    Classes are dealt round-robin so every class has at least one site."""
    classes = np.unique(labels)
    if labels_per_site > len(classes):
        raise MedfedError(
            f"partition.labels_per_site={labels_per_site} but the dataset has {len(classes)} classes"
        )
    if sites * labels_per_site < len(classes):
        raise MedfedError(
            f"pathological partition with {sites} sites x {labels_per_site} labels cannot cover "
            f"{len(classes)} classes; raise --sites or partition.labels_per_site"
        )
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    slot = 0
    for site in range(sites):
        held: set[int] = set()
        while len(held) < labels_per_site:
            cls = int(order[slot % len(order)])
            slot += 1
            if cls not in held:
                held.add(cls)
                holders[cls].append(site)
    parts: list[list[int]] = [[] for _ in range(sites)]
    for cls, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == cls))
        for owner, chunk in zip(owners, np.array_split(members, len(owners))):
            parts[owner].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def partition(labels: np.ndarray, *, scheme: str, sites: int, alpha: float, labels_per_site: int,
              seed: int, min_size: int = 0, attempts: int = 100) -> list[np.ndarray]:
    """Partition with the named scheme.

    Random schemes are redrawn (from the same seeded generator, so still reproducible) until every
    site holds at least `min_size` examples, as is usual for Dirichlet benchmarks; after `attempts`
    draws the caller gets the last one and decides."""
    if sites < 1:
        raise MedfedError(f"cannot partition into {sites} sites; use 1 or more")
    if scheme in ("dirichlet", "quantity") and not (alpha > 0 and np.isfinite(alpha)):
        # Dirichlet(inf) draws NaN shares, which silently put every example on the last site.
        raise MedfedError(f"partition.alpha={alpha!r}: the {scheme} partition needs a finite alpha > 0")
    rng = np.random.default_rng(seed)
    draw = {
        "iid": lambda: iid(labels, sites=sites, rng=rng),
        "dirichlet": lambda: dirichlet(labels, sites=sites, alpha=alpha, rng=rng),
        "quantity": lambda: quantity(labels, sites=sites, alpha=alpha, rng=rng),
        "pathological": lambda: pathological(labels, sites=sites, labels_per_site=labels_per_site,
                                             rng=rng),
    }
    if scheme not in draw:
        raise MedfedError(f"unknown partition scheme '{scheme}'")
    for _ in range(attempts):
        parts = draw[scheme]()
        if min(len(p) for p in parts) >= min_size:
            break
    return parts
