"""One DICOM file in, what a reader would see on a viewer out.

The single place that knows how stored DICOM values become display pixels: modality rescale,
the file's own VOI LUT or window, MONOCHROME1 inversion, frame choice, palette and YBR colour.
Keeping that here means a CT exported as DICOM and the same slice exported as PNG by a PACS end
up alike, and no caller re-derives windowing. A damaged or unusable DICOM (truncated, no pixel
data, compressed without a decoder, inconsistent image elements) is an `ImageReadError`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medfed.common.decoded_image import (
    DecodedImage,
    ImageReadError,
    percentile_unit,
    shape_info,
    unit_to_uint8,
)

_UNDEFINED_LENGTH = 0xFFFFFFFF
# Enhanced (multi-frame) objects keep rescale and window inside functional groups, per frame or
# shared; pydicom's LUT functions read only top-level elements, so these are lifted up.
_FRAME_GROUP_ELEMENTS = (
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)
# What pydicom itself assumes when a file has no file meta header (ACR-NEMA style exports).
_SYNTAX_BY_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
# What pydicom raises for malformed bytes while parsing, or when it converts an element value on
# first access: its reader reports damage through struct, codec, length and value errors.
_PARSE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    NotImplementedError,
    struct.error,
)
# What pydicom's decoders and LUT functions raise when image elements are missing, inconsistent
# or hold values of the wrong type (pydicom keeps invalid values as text after warning).
_IMAGE_ELEMENT_ERRORS = (
    AttributeError,
    BytesLengthException,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RuntimeError,
    NotImplementedError,
    struct.error,
)
# Elements read outside the guarded decode and display steps; converting them while parsing
# keeps a damaged value from surfacing later as a bare exception.
_HEADER_KEYWORDS = ("Modality", "PatientID", "SOPClassUID")
_IMAGE_PIXEL_GROUP = 0x0028


def read_dicom(path: Path, *, has_marker: bool, frame: int | None) -> DecodedImage:
    """Decode one DICOM file (`has_marker`: it carries the 'DICM' marker at byte 128); `frame`
    as for `imaging.read_image`."""
    ds = _parse_dicom(path, has_marker=has_marker)
    syntax = _transfer_syntax(ds)
    _require_decoder(syntax)
    try:
        n_frames = int(get_nr_frames(ds, warn=False))
        index = _frame_index(frame, n_frames)
        if syntax.is_encapsulated:
            _check_encoded_size(ds, index=index, n_frames=n_frames)
        stored = pixel_array(ds, index=index)
    except _IMAGE_ELEMENT_ERRORS as exc:
        raise ImageReadError(f"the DICOM pixel data cannot be decoded: {_one_line(exc)}") from exc

    # pixel_array has validated the Image Pixel module, so these elements exist and are sane.
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    try:
        pixels, windowing = _display(stored, ds, photometric=photometric, index=index)
    except _IMAGE_ELEMENT_ERRORS as exc:
        raise ImageReadError(
            f"the DICOM's display elements (rescale, window, LUTs) are unusable: {_one_line(exc)}"
        ) from exc
    info = shape_info("dicom", pixels, bits=int(ds.BitsStored))
    info.update(
        modality=_text(ds, "Modality"),
        photometric=photometric,
        transfer_syntax=syntax.name,
        frames=n_frames,
        frame=index,
        patient_id=_text(ds, "PatientID"),
        windowing=windowing,
    )
    return DecodedImage(pixels=pixels, info=info)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = str(ds.get(keyword, "") or "").strip()
    return value or None


def _display(
    stored: np.ndarray, ds: Dataset, *, photometric: str, index: int
) -> tuple[np.ndarray, str]:
    if photometric in ("MONOCHROME1", "MONOCHROME2") and stored.ndim == 2:
        _lift_frame_groups(ds, index)
        return _display_grayscale(stored, ds, monochrome1=photometric == "MONOCHROME1")
    if photometric == "PALETTE COLOR" and stored.ndim == 2:
        return _display_palette(stored, ds), "none"
    if stored.ndim == 3 and stored.shape[-1] == 3:
        # pydicom's pixel_array already returns RGB for RGB and the YBR family (it converts
        # YBR_FULL/_422 itself; the JPEG 2000 decoder undoes YBR_ICT/RCT).
        return _scale_full_range(stored, int(ds.BitsStored)), "none"
    samples = 1 if stored.ndim == 2 else stored.shape[-1]
    raise ImageReadError(
        f"photometric interpretation {photometric!r} with {samples} sample(s) per pixel is not "
        "supported; export the image as MONOCHROME2 or RGB"
    )


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _parse_dicom(path: Path, *, has_marker: bool) -> Dataset:
    # A .dcm without the 'DICM' marker may be an old export without preamble; pydicom can read
    # those only when forced, and then reads anything, so such a file must show pixel data.
    try:
        ds = pydicom.dcmread(path, force=not has_marker)
        # pydicom converts values on first access; converting those read later, outside a
        # guarded step, makes a damaged value fail here as an unreadable file.
        image_pixel_tags = [tag for tag in ds.keys() if tag.group == _IMAGE_PIXEL_GROUP]
        for key in [*image_pixel_tags, *_HEADER_KEYWORDS]:
            ds.get(key)
    except _PARSE_ERRORS as exc:
        # The file opened fine a moment ago, so an OSError here is pydicom's parser giving up.
        raise ImageReadError(f"unreadable DICOM: {_one_line(exc)}") from exc

    if not has_marker and "PixelData" not in ds:
        raise ImageReadError(
            "not a DICOM image: there is no 'DICM' marker at byte 128 and no Pixel Data "
            "element could be read"
        )
    if (truncation := _truncation(ds)) is not None:
        raise ImageReadError(f"the DICOM file is truncated or damaged: {truncation}")
    if "PixelData" in ds:
        return ds
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ImageReadError(
            "the DICOM holds floating-point pixel data (e.g. a parametric map), which is not a "
            "displayable image; export the source images instead"
        )
    sop_class = UID(str(ds.get("SOPClassUID") or ""))
    # Only a well-formed UID is named: a damaged length makes the value swallow the elements
    # after it (raw bytes, newlines, the patient's name), which must not reach a message.
    kind = f" (SOP class: {sop_class.name})" if sop_class.is_valid else ""
    raise ImageReadError(f"no Pixel Data element: this DICOM object holds no image{kind}")


def _truncation(ds: Dataset) -> str | None:
    """Why the dataset looks cut short, or None.

    pydicom reads a truncated file without complaint: it keeps what it got, so a file cut inside
    its pixel data still "has" Pixel Data, only shorter than declared, and a file cut inside an
    encapsulated (compressed) element comes back with no elements at all.
    """
    if len(ds) == 0:
        return "no data element could be read after the file header"
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    if (
        isinstance(last, RawDataElement)
        and last.length != _UNDEFINED_LENGTH
        and last.value is not None
        and len(last.value) < last.length
    ):
        return (
            f"the file ends inside element {last.tag} after {len(last.value)} of its "
            f"{last.length} bytes"
        )
    return None


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        syntax = _SYNTAX_BY_ENCODING.get(tuple(ds.original_encoding))
        if syntax is None:
            raise ImageReadError("the DICOM has no transfer syntax and its encoding is unknown")
        meta.TransferSyntaxUID = syntax
    return UID(str(meta.TransferSyntaxUID))


def _require_decoder(syntax: UID) -> None:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageReadError(
            f"pydicom cannot decode pixel data stored as '{syntax.name}'; export the images "
            "uncompressed or as JPEG / JPEG 2000"
        ) from exc
    if not decoder.is_available:
        raise ImageReadError(
            f"the pixel data is compressed as '{syntax.name}' and no decoder for it is "
            "installed; install the packages of one of these pydicom plugins: "
            + "; ".join(decoder.missing_dependencies)
        )


def _check_encoded_size(ds: Dataset, *, index: int, n_frames: int) -> None:
    """Refuse a compressed frame whose own header disagrees with Rows/Columns.

    Decoders size their output from the codestream header, before any check against the
    DICOM; a damaged JPEG 2000 header made openjpeg allocate 11 GB (another 24 GB, killing the
    process) before failing. Comparing the two sizes first turns that into a reason.
    """
    offsets = None
    if "ExtendedOffsetTable" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    encoded = get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=n_frames)
    size = _jpeg_size(encoded) if encoded.startswith(b"\xff\xd8") else _j2k_size(encoded)
    expected = (int(ds.Rows), int(ds.Columns))
    if size is not None and size != expected:
        raise ImageReadError(
            f"the compressed frame says it is {size[0]} x {size[1]} pixels but the DICOM header "
            f"says {expected[0]} x {expected[1]} (Rows x Columns); the file is damaged"
        )


def _j2k_size(encoded: bytes) -> tuple[int, int] | None:
    # SOC marker then SIZ: Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz (PS3.5 A.4.4, ISO 15444-1).
    start = encoded.find(b"\xff\x4f\xff\x51", 0, 1024)
    if start < 0 or len(encoded) < start + 24:
        return None
    width, height, x_offset, y_offset = struct.unpack(">4I", encoded[start + 8:start + 24])
    return height - y_offset, width - x_offset


def _jpeg_size(encoded: bytes) -> tuple[int, int] | None:
    # Walk marker segments to the start-of-frame (SOF0-15 except DHT/JPG/DAC, or JPEG-LS SOF55):
    # length, precision, then lines and samples per line.
    pos = 2
    while pos + 9 <= len(encoded) and encoded[pos] == 0xFF:
        marker = encoded[pos + 1]
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            rows, columns = struct.unpack(">2H", encoded[pos + 5:pos + 9])
            return (rows, columns) if rows else None  # 0 lines: height comes later (DNL)
        pos += 2 + struct.unpack(">H", encoded[pos + 2:pos + 4])[0]
    return None


def _frame_index(frame: int | None, n_frames: int) -> int:
    if frame is None:
        return n_frames // 2
    if not 0 <= frame < n_frames:
        raise ImageReadError(
            f"frame {frame} is out of range: this file has {n_frames} frame(s), "
            f"valid frames are 0 to {n_frames - 1}"
        )
    return frame


def _lift_frame_groups(ds: Dataset, index: int) -> None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = []
    if shared:
        groups.append(shared[0])
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])  # last, so a per-frame value wins over a shared one
    for group in groups:
        for sequence, keywords in _FRAME_GROUP_ELEMENTS:
            items = group.get(sequence)
            if not items:
                continue
            for keyword in keywords:
                if keyword in items[0]:
                    setattr(ds, keyword, items[0][keyword].value)


def _display_grayscale(
    stored: np.ndarray, ds: Dataset, *, monochrome1: bool
) -> tuple[np.ndarray, str]:
    values = apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
        unit, windowing = _voi_lut_unit(values, ds), "voi_lut"
    elif (unit := _window_unit(values, ds)) is not None:
        windowing = "window"
    elif _is_display_ready(ds):
        unit, windowing = stored / (2 ** int(ds.BitsStored) - 1), "none"
    else:
        unit, windowing = percentile_unit(values, valid=_not_padding(stored, ds)), "percentile"
    gray = unit_to_uint8(unit)
    # MONOCHROME1 stores air as the highest value; inverting after the window makes its
    # display match MONOCHROME2 (air dark, bone bright), as a viewer would show it.
    return (255 - gray if monochrome1 else gray), windowing


def _is_display_ready(ds: Dataset) -> bool:
    """8-bit (or fewer) unsigned values with no modality transform are already display values,
    as in secondary captures, scanned film and segmentations: stretching them by percentiles
    would make a DICOM export look different from the same image saved as PNG."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (
        int(ds.BitsStored) <= 8
        and int(ds.PixelRepresentation) == 0
        and not ds.get("ModalityLUTSequence")
        and (slope, intercept) == (1.0, 0.0)
    )


def _voi_lut_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    # A VOI LUT is indexed by whole stored values; pydicom warns on (and mis-indexes) floats,
    # which is what a rescale leaves behind.
    indices = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
    mapped = apply_voi(indices, ds)
    n_entries, first_mapped, _ = ds.VOILUTSequence[0].LUTDescriptor
    # The LUT's own output range, not its nominal bit depth: many LUTs declare 16 bits and
    # use 12, which would otherwise display almost black.
    table = apply_voi(np.arange(first_mapped, first_mapped + (n_entries or 2**16)), ds)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros(mapped.shape)
    return (mapped - low) / (high - low)


def _window_unit(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The file's Window Center/Width applied, as 0..1; None when it has no usable window."""
    if any(ds.get(keyword) in (None, "") for keyword in ("WindowCenter", "WindowWidth")):
        return None
    try:
        windowed = apply_windowing(values, ds)
        # pydicom maps the window onto the stored value range (which depends on bits, sign and
        # rescale); windowing -inf and +inf yields exactly that range's dark and bright ends.
        dark, bright = apply_windowing(np.array([-np.inf, np.inf]), ds)
    except (ValueError, TypeError):
        # pydicom rejects unusable window values (width < 1, an unknown VOI LUT Function, text
        # kept from an invalid DS value); the image is still usable with a window of our own.
        return None
    if bright == dark:  # a zero Rescale Slope collapses the output range
        return None
    return (windowed - dark) / (bright - dark)


def _not_padding(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Mask of real (non-padding) pixels: CT padding around the circular field of view can be
    a fifth of the image and would otherwise become the bottom of the percentile window."""
    padding_value = ds.get("PixelPaddingValue")
    if padding_value is None:
        return None
    return stored != padding_value


def _display_palette(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    rgb = apply_color_lut(stored, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    # Palette entries are 8 or 16 bits; the high byte is the displayed intensity.
    return (rgb >> max(bits - 8, 0)).astype(np.uint8)


def _scale_full_range(stored: np.ndarray, bits: int) -> np.ndarray:
    if stored.dtype == np.uint8:
        return stored
    return unit_to_uint8(stored / (2**bits - 1))
