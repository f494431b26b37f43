"""Labelled images in memory and the MedMNIST npz layout medfed reads and writes.

The layout (`train_images`, `train_labels`, `val_…`, `test_…`; labels shaped (N,) or (N, 1)) is
MedMNIST's. medfed also writes each simulated site's data in it, so a site reads its own file
the same way whether it is simulated or a real hospital given an npz.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.common.errors import MedfedError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledImages:
    """uint8 images, (N, H, W) grayscale or (N, H, W, 3) RGB, with integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index])

    @staticmethod
    def pooled(parts: list[LabelledImages]) -> LabelledImages:
        """Several splits or sites as one (pooled training data, a global test set)."""
        return LabelledImages(np.concatenate([p.images for p in parts]),
                              np.concatenate([p.labels for p in parts]))

    def histogram(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()


def load_splits(path: str | Path) -> dict[str, LabelledImages]:
    """Read every split present in a MedMNIST-layout npz, with errors that name the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            splits = {
                split: LabelledImages(
                    np.ascontiguousarray(npz[f"{split}_images"]),
                    np.asarray(npz[f"{split}_labels"]).reshape(-1).astype(np.int64),
                )
                for split in SPLITS
                if f"{split}_images" in npz.files
            }
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise MedfedError(
            f"{path} is not a readable MedMNIST npz ({exc}); delete it and download it again"
        ) from None
    if not splits:
        raise MedfedError(
            f"{path} holds no train_images/val_images/test_images arrays; it is not a MedMNIST npz"
        )
    for split, data in splits.items():
        if data.images.dtype != np.uint8 or data.images.ndim not in (3, 4):
            raise MedfedError(
                f"{path}: {split}_images must be uint8 (N,H,W) or (N,H,W,3), "
                f"got {data.images.dtype} {data.images.shape}"
            )
        if len(data.images) != len(data.labels):
            raise MedfedError(
                f"{path}: {split} has {len(data.images)} images but {len(data.labels)} labels"
            )
    return splits


def save_splits(path: str | Path, splits: dict[str, LabelledImages]) -> None:
    arrays = {}
    for split, data in splits.items():
        arrays[f"{split}_images"] = data.images
        arrays[f"{split}_labels"] = data.labels.reshape(-1, 1)
    np.savez_compressed(path, **arrays)


class TransformedImages(torch.utils.data.Dataset):
    """A torch Dataset over LabelledImages through an albumentations pipeline."""

    def __init__(self, data: LabelledImages, transform) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image = self.data.images[index]
        if image.ndim == 2:
            # Grayscale becomes 3 identical channels so ImageNet-pretrained stems apply unchanged.
            image = np.repeat(image[:, :, None], 3, axis=2)
        return self.transform(image=image)["image"], int(self.data.labels[index])
