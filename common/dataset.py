"""Labelled images in memory and the MedMNIST npz layout medfed reads and writes.

The layout (`train_images`, `train_labels`, `val_…`, `test_…`; labels shaped (N,) or (N, 1)) is
MedMNIST's. medfed also writes each simulated site's data in it, so a site reads its own file
the same way whether it is simulated or a real hospital given an npz.
"""

from __future__ import annotations

import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.common.errors import MedfedError, few

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


# What numpy, zipfile and zlib raise for a damaged or foreign file: a bad zip directory, a CRC
# mismatch, a deflate stream cut or corrupted mid-file (zlib.error), an unknown compression
# method, a flipped "encrypted" flag (RuntimeError), a mangled .npy header (parsed with
# tokenize/ast). Any of these is the user's file, not a bug, and is reported as one line naming
# the file.
UNREADABLE_NPZ = (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zlib.error,
                  NotImplementedError, RuntimeError, struct.error, tokenize.TokenError,
                  SyntaxError, MemoryError, OverflowError)


def load_splits(path: str | Path, *, num_classes: int | None = None, classes_of: str = ""
                ) -> dict[str, LabelledImages]:
    """Read every split present in a MedMNIST-layout npz, with errors that name the file.

    Labels must be whole numbers from 0, and below `num_classes` when it is given (see
    `check_labels`)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {
                split: (np.ascontiguousarray(npz[f"{split}_images"]),
                        np.asarray(npz[f"{split}_labels"]).reshape(-1))
                for split in SPLITS
                if f"{split}_images" in npz.files
            }
    except UNREADABLE_NPZ as exc:
        kind = type(exc)
        reason = (kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
                  ) + (": " + " ".join(str(exc).split()) if str(exc) else "")
        raise MedfedError(
            f"{path} is not a readable MedMNIST npz ({reason[:200]}): the file is damaged or not "
            f"an npz; a downloaded MedMNIST file can be deleted and downloaded again"
        ) from None
    splits = {}
    for split, (images, labels) in raw.items():
        if labels.dtype.kind not in "biuf" or (
                labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels)))):
            raise MedfedError(f"{path}: {split}_labels must be whole class numbers, got "
                              f"{labels.dtype} values such as {few(np.unique(labels)[:6].tolist())}")
        splits[split] = LabelledImages(images, labels.astype(np.int64))
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
    check_labels(path, splits, num_classes, classes_of=classes_of)
    return splits


def check_labels(path: str | Path, splits: dict[str, LabelledImages], num_classes: int | None = None,
                 *, classes_of: str = "") -> None:
    """Refuse labels outside 0..num_classes-1 (outside 0.. when the class count is not known yet),
    naming the file, the bad labels with their counts, and the allowed range: a label out of range
    would otherwise train and then fail at the first evaluation."""
    bad = []
    for split, data in splits.items():
        labels = data.labels
        out = (labels < 0) if num_classes is None else ((labels < 0) | (labels >= num_classes))
        if out.any():
            values, counts = np.unique(labels[out], return_counts=True)
            bad.append(f"{split}_labels has " + few(
                [f"{v} ({c} image{'s' if c > 1 else ''})" for v, c in zip(values.tolist(), counts.tolist())],
                shown=3))
    if bad:
        allowed = ("0 or more" if num_classes is None
                   else f"0 to {num_classes - 1} ({num_classes} classes{classes_of})")
        raise MedfedError(f"{path}: labels out of range: {'; '.join(bad)}; labels must be {allowed}")


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
