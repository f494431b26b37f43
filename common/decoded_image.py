"""What decoding one image file yields: display-ready 8-bit pixels, or why the file is unusable.

Everything downstream (datasets, the data check, inference) sees only uint8 grayscale or RGB
arrays (`DecodedImage`); the DICOM and the PNG/JPEG decoders (`common.dicom`, `common.imaging`)
share the steps here that bring sample values onto 0..255.

A bad file becomes a reason instead of a traceback: every way a file can be unusable (empty,
truncated, not an image, compressed without a decoder) is an `ImageReadError` whose message says
what is wrong; the caller adds the file name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Wide enough to ignore a few hot or dead pixels and burned-in text, narrow enough not to clip
# anatomy; used whenever the source carries no window of its own.
_PERCENTILE_WINDOW = (0.5, 99.5)


class ImageReadError(Exception):
    """Why one file cannot be used (message is the reason, no file name needed; caller adds it)."""

    def __init__(self, reason: str) -> None:
        # A reason may quote the file's own bytes (a damaged transfer syntax UID, a decoder's
        # message): it stays one line of printable text, control characters escaped.
        super().__init__("".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                                 for c in str(reason)))


@dataclass(frozen=True)
class DecodedImage:
    """Display-ready pixels plus JSON-able facts about the source file.

    `pixels` is uint8, (H, W) grayscale or (H, W, 3) RGB, rows top to bottom as displayed.
    `info` holds "format" ("dicom" | "png" | "jpeg"), "height", "width", "channels" and
    "bits" (bits stored / per sample in the source); DICOM adds "modality", "photometric",
    "transfer_syntax", "frames", "frame" (the one decoded), "patient_id" and "windowing"
    ("voi_lut" | "window" | "percentile" | "none").
    """

    pixels: np.ndarray
    info: dict


def percentile_unit(values: np.ndarray, *, valid: np.ndarray | None = None) -> np.ndarray:
    sample = values[valid] if valid is not None and valid.any() else values
    low, high = np.percentile(sample, _PERCENTILE_WINDOW)
    if high <= low:
        # Fewer than 0.5% of pixels differ from the rest (e.g. a marker on black): their
        # full range is the only contrast there is.
        low, high = sample.min(), sample.max()
    if high <= low:
        return np.zeros(values.shape)
    return (values - low) / (high - low)


def unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def shape_info(fmt: str, pixels: np.ndarray, *, bits: int) -> dict:
    return {
        "format": fmt,
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "channels": 1 if pixels.ndim == 2 else int(pixels.shape[2]),
        "bits": int(bits),
    }
