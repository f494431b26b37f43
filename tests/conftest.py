"""Shared fixtures for the medfed test suite.

Real MedMNIST files live outside the repository, in a `shared/` folder beside the checkout
(CI clones main elsewhere and copies `shared/` beside it). `$MEDFED_DATA_DIR` overrides the
search (it is then the only place looked at). Tests that need the files skip, with the reason,
when the files are not there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medfed.common.dataset import LabelledImages, load_splits

DATA_ENV = "MEDFED_DATA_DIR"
REQUIRED_FILES = ("breastmnist.npz", "pneumoniamnist.npz")


def _candidate_data_dirs() -> list[Path]:
    """$MEDFED_DATA_DIR when set (and then only it), else `shared/` beside the checkout."""
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).expanduser()]
    here = Path(__file__)
    candidates = [
        here.parents[2] / "shared" / "data" / "medmnist",
        here.resolve().parents[1].parent / "shared" / "data" / "medmnist",
    ]
    return list(dict.fromkeys(candidates))


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    """Folder holding the real MedMNIST npz files (breastmnist, pneumoniamnist)."""
    tried = []
    for candidate in _candidate_data_dirs():
        if all((candidate / name).is_file() for name in REQUIRED_FILES):
            return candidate
        tried.append(str(candidate))
    pytest.skip(
        f"real MedMNIST files ({', '.join(REQUIRED_FILES)}) not found in {', '.join(tried)}; "
        f"set ${DATA_ENV} to a folder that holds them"
    )


@pytest.fixture(scope="session")
def pneumonia_labels(medmnist_dir: Path) -> np.ndarray:
    """PneumoniaMNIST train+val labels concatenated, as the simulation partitions them."""
    splits = load_splits(medmnist_dir / "pneumoniamnist.npz")
    return np.concatenate([splits["train"].labels, splits["val"].labels])


@pytest.fixture
def tiny_images() -> LabelledImages:
    """Eight random 28x28 grayscale uint8 images with balanced binary labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1] * 4, dtype=np.int64)
    return LabelledImages(images, labels)
