"""Shared fixtures for the medfed test suite.

Real MedMNIST files live outside the repository, in a `shared/` folder beside the checkout
(CI clones main elsewhere and copies `shared/` beside it). `$MEDFED_DATA_DIR` overrides the
search (it is then the only place looked at). Tests that need the files skip, with the reason,
when the files are not there.

`evaluation_record` is the one helper tests share for a site's evaluation record (the flat
MetricRecord of an evaluation reply, and of a training reply's `evaluation` record).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord

from medfed.common.dataset import LabelledImages, load_splits
from medfed.common.messages import EVALUATED_SPLITS, evaluation_metrics
from medfed.common.metrics import SCALARS

DATA_ENV = "MEDFED_DATA_DIR"
REQUIRED_FILES = ("breastmnist.npz", "pneumoniamnist.npz")


def per_class(total: int, num_classes: int) -> list[int]:
    """`total` examples spread as evenly as possible over `num_classes` classes."""
    return [total // num_classes + (i < total % num_classes) for i in range(num_classes)]


def evaluation_record(n: int = 10, *, num_classes: int = 2, val_loss: float = 0.5,
                      train_histogram: list[int] | None = None) -> MetricRecord:
    """A valid evaluation record for `n` validation examples and `num_classes` classes, built by
    the sites' own builder (messages.evaluation_metrics): every scalar 0.5, the val and test
    splits `n` examples each, spread evenly and all predicted right. `train_histogram` (default:
    1,000 examples spread evenly) is what the site declares it trains on, the bound on the
    `num-examples` of its later training replies."""
    val = per_class(n, num_classes)
    matrix = np.diag(val).tolist()
    results = {split: {**{name: 0.5 for name in SCALARS}, "loss": val_loss,
                       "confusion_matrix": matrix} for split in EVALUATED_SPLITS}
    train = per_class(1000, num_classes) if train_histogram is None else list(train_histogram)
    return evaluation_metrics(results, histograms={"train": train, "val": val, "test": list(val)},
                              num_examples=n)


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


# The files that take longest, started first: `make test` runs two xdist workers, each taking
# whole files in this order (`--no-loadscope-reorder`: xdist would otherwise start the files
# with most tests first), and a long file started last would run on alone at the end.
LONGEST_FIRST = ("test_deployment_e2e.py", "test_resume.py", "test_compare.py", "test_bench.py",
                 "test_simulate_e2e.py", "test_attacks.py", "test_simulate_data.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
