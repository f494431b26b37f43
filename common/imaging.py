"""One hospital image file (DICOM, PNG or JPEG) in, display-ready 8-bit pixels out.

The entry point of decoding: `read_image` tells a DICOM (the 'DICM' marker or its suffix) from a
PNG or JPEG, hands the DICOM to `common.dicom` and decodes the others here, upright by their EXIF
orientation. Either way the result is a `DecodedImage`, and a file that cannot be used is an
`ImageReadError` with the reason (`common.decoded_image`).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medfed.common.decoded_image import (
    DecodedImage,
    ImageReadError,
    percentile_unit,
    shape_info,
    unit_to_uint8,
)
from medfed.common.dicom import read_dicom

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MARKER_OFFSET = 128
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg"}
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
# Pillow opens 16-bit grayscale PNGs as "I;16" (older releases: "I").
_SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def is_dicom(path) -> bool:
    """True when the file carries the DICOM 'DICM' marker or a .dcm/.dicom suffix."""
    path = Path(path)
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return _has_dicom_marker(handle.read(_DICOM_MARKER_OFFSET + 4))
    except OSError:
        return False


def read_image(path, *, frame: int | None = None) -> DecodedImage:
    """Decode one image file; `frame` picks a frame of a multi-frame DICOM (None: the middle one).

    Raises `ImageReadError` for any file that cannot be used, with the reason as its message.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_MARKER_OFFSET + 4)
    except OSError as exc:
        raise ImageReadError(f"the file cannot be opened: {exc.strerror or exc}") from exc
    if not head:
        raise ImageReadError("the file is empty (0 bytes)")
    has_marker = _has_dicom_marker(head)
    if has_marker or path.suffix.lower() in _DICOM_SUFFIXES:
        return read_dicom(path, has_marker=has_marker, frame=frame)
    return _read_png_or_jpeg(path, head, frame=frame)


def _has_dicom_marker(head: bytes) -> bool:
    return head[_DICOM_MARKER_OFFSET:_DICOM_MARKER_OFFSET + 4] == b"DICM"


# --- PNG / JPEG ------------------------------------------------------------------------------


def _read_png_or_jpeg(path: Path, head: bytes, *, frame: int | None) -> DecodedImage:
    if frame not in (None, 0):
        raise ImageReadError(f"frame {frame} is out of range: a PNG or JPEG has one frame (0)")
    try:
        with Image.open(path, formats=tuple(_PIL_FORMATS)) as image:
            image.load()
            fmt = _PIL_FORMATS[image.format]
            upright = _exif_upright(image)
    except UnidentifiedImageError as exc:
        raise ImageReadError(_unidentified_reason(head)) from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"the image is too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow opens lazily and reports damage only when decoding: OSError for truncation,
        # SyntaxError for a failed PNG checksum, ValueError for impossible tile geometry.
        raise ImageReadError(f"the image data is damaged or truncated: {exc}") from exc

    mode = upright.mode
    if mode in ("1", "L", "LA"):
        pixels = np.asarray(upright.convert("L"))
    elif mode in _SIXTEEN_BIT_GRAY_MODES:
        pixels = unit_to_uint8(percentile_unit(np.asarray(upright, dtype=np.float64)))
    elif mode in ("P", "PA"):
        # Through RGBA so a palette's transparency entry is understood rather than warned about.
        pixels = np.asarray(upright.convert("RGBA").convert("RGB"))
    elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        pixels = np.asarray(upright.convert("RGB"))
    else:
        raise ImageReadError(f"the {fmt.upper()} has pixel mode {mode!r}, which is not supported")
    info = shape_info(fmt, pixels, bits=_source_bits(fmt, head))
    return DecodedImage(pixels=pixels, info=info)


def _unidentified_reason(head: bytes) -> str:
    for signature, name in _SIGNATURES.items():
        if head.startswith(signature):
            return (
                f"the file starts like a {name} but cannot be opened: its header is damaged or it "
                "is a variant Pillow does not decode (e.g. 12-bit JPEG)"
            )
    return "the content is not a PNG, JPEG or DICOM image"


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, struct.error, ValueError, TypeError, AttributeError, KeyError) as exc:
        # Pillow's EXIF parser fails in many ways on damaged tags (measured by fuzzing); without
        # the tag the upright orientation is unknown, and guessing could flip anatomy.
        raise ImageReadError(
            f"the EXIF metadata is damaged, so the image orientation is unknown: {exc}"
        ) from exc


def _source_bits(fmt: str, head: bytes) -> int:
    """Bits per sample in the file, which Pillow hides: it silently reduces 16-bit RGB PNGs to
    8 bits, and a data check needs to see a folder that mixes 8- and 16-bit sources."""
    if fmt == "jpeg":
        return 8  # Pillow decodes only 8-bit JPEG; 12-bit files fail to open
    # IHDR is the first chunk: 8-byte signature, length, type, width, height, then depth, colour.
    bit_depth, colour_type = head[24], head[25]
    return 8 if colour_type == 3 else bit_depth  # palette: depth sizes the index; entries are 8-bit
