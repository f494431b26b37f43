"""Decoding hospital image files into display-ready pixels (medfed.common.imaging).

DICOM checks run on real files: pydicom's own CT/MR samples and the pydicom-data collection
(CR MONOCHROME1 and its JPEG 2000 twin, RGB ultrasound, multi-frame MR). Expected pixels come
from the DICOM standard's formulas or from variants of the same file, not from the module.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import JPEG2000, MPEG2MPML

from medfed.common.decoded_image import ImageReadError
from medfed.common.imaging import IMAGE_SUFFIXES, is_dicom, read_image


NO_PYDICOM_DATA = "pydicom-data is not installed (pip install pydicom-data)"


def _testdata(name: str) -> str:
    """Path of a pydicom sample; CT/MR ship with pydicom, the rest with pydicom-data."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.importorskip("data_store", reason=NO_PYDICOM_DATA)
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


@pytest.fixture(scope="module")
def cr_uncompressed():
    return read_image(_testdata("RG3_UNCR.dcm"))


def _variant(tmp_path, name: str, *, source: str = "CT_small.dcm", **changes) -> str:
    """A copy of a pydicom sample with elements set (value) or deleted (None)."""
    ds = pydicom.dcmread(_testdata(source))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path)
    return str(path)


def _standard_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) scaled to 0..255."""
    unit = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return np.rint(unit * 255).astype(np.uint8)


# --- DICOM: grayscale ------------------------------------------------------------------------


def test_cr_monochrome1_is_windowed_then_inverted(cr_uncompressed):
    decoded = cr_uncompressed
    stored = pydicom.dcmread(_testdata("RG3_UNCR.dcm")).pixel_array.astype(np.float64)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (1760, 1760)
    assert decoded.info == {
        "format": "dicom", "height": 1760, "width": 1760, "channels": 1, "bits": 10,
        "modality": "CR", "photometric": "MONOCHROME1",
        "transfer_syntax": "Explicit VR Little Endian", "frames": 1, "frame": 0,
        "patient_id": "11RG3", "windowing": "window",
    }
    # Window 550/1024 over 10-bit values, then MONOCHROME1 inversion: high stored values dark.
    np.testing.assert_array_equal(decoded.pixels, 255 - _standard_window(stored, 550, 1024))
    json.dumps(decoded.info)


def test_jpeg2000_twin_matches_uncompressed(cr_uncompressed):
    twin = read_image(_testdata("RG3_J2KI.dcm"))
    assert twin.info["transfer_syntax"] == "JPEG 2000 Image Compression"
    assert twin.pixels.shape == cr_uncompressed.pixels.shape
    a = cr_uncompressed.pixels.astype(np.float64)
    b = twin.pixels.astype(np.float64)
    # Lossy J2K: measured 0.18 levels mean, 3 at most, correlation 0.99999.
    assert np.abs(a - b).mean() < 0.5
    assert np.abs(a - b).max() <= 4
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999


def test_mr_window_saturates_outside_and_is_linear_inside(tmp_path):
    stored = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array.astype(np.float64)
    own = read_image(_testdata("MR_small.dcm"))
    assert own.info["windowing"] == "window" and own.info["modality"] == "MR"
    np.testing.assert_array_equal(own.pixels, _standard_window(stored, 600, 1600))
    assert (own.pixels[stored > 600 + 1600 / 2] == 255).all() and (stored > 1400).sum() > 100

    # The file's own window leaves nothing below it, so narrow it to exercise both ends.
    narrow = read_image(_variant(tmp_path, "narrow.dcm", source="MR_small.dcm",
                                 WindowCenter=800, WindowWidth=400))
    below, above = stored <= 800 - 400 / 2, stored > 800 + 400 / 2
    assert below.sum() > 100 and above.sum() > 100
    assert (narrow.pixels[below] == 0).all() and (narrow.pixels[above] == 255).all()
    np.testing.assert_array_equal(narrow.pixels, _standard_window(stored, 800, 400))


def test_missing_window_falls_back_to_percentile(tmp_path):
    path = _variant(tmp_path, "nowindow.dcm", source="MR_small.dcm",
                    WindowCenter=None, WindowWidth=None)
    decoded = read_image(path)
    assert decoded.info["windowing"] == "percentile"
    # 0.5-99.5 %: at least half a percent of pixels saturate at each end, and no more than the
    # ties at those values add.
    assert 0.005 <= (decoded.pixels == 0).mean() < 0.03
    assert 0.005 <= (decoded.pixels == 255).mean() < 0.03
    assert not np.array_equal(decoded.pixels, read_image(_testdata("MR_small.dcm")).pixels)


def test_ct_without_window_uses_percentile_of_rescaled_values():
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    hounsfield = apply_modality_lut(ds.pixel_array, ds)
    low, high = np.percentile(hounsfield, (0.5, 99.5))
    decoded = read_image(_testdata("CT_small.dcm"))
    assert decoded.info["windowing"] == "percentile" and decoded.info["bits"] == 16
    expected = np.rint(np.clip((hounsfield - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decoded.pixels, expected)


def test_monochrome1_copy_is_exact_inverse(tmp_path):
    plain = read_image(_variant(tmp_path, "m2.dcm"))
    inverted = read_image(_variant(tmp_path, "m1.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert inverted.info["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(inverted.pixels, 255 - plain.pixels)


@pytest.mark.parametrize("slope, intercept, center, width, function", [
    (1, 0, 40 + 1024, 400, "LINEAR"),           # same HU, window moved with the intercept
    (2, -2048, 80, 800, "LINEAR_EXACT"),        # doubled units; LINEAR's -0.5/-1 don't scale
])
def test_rescale_is_applied_before_the_window(tmp_path, slope, intercept, center, width, function):
    reference = read_image(_variant(tmp_path, "ref.dcm", WindowCenter=40, WindowWidth=400,
                                    VOILUTFunction=function))
    rescaled = read_image(_variant(tmp_path, "rescaled.dcm", RescaleSlope=slope,
                                   RescaleIntercept=intercept, WindowCenter=center,
                                   WindowWidth=width, VOILUTFunction=function))
    assert reference.info["windowing"] == rescaled.info["windowing"] == "window"
    assert 0 < (reference.pixels == 0).mean() < 0.9  # the window really clips this image
    np.testing.assert_array_equal(rescaled.pixels, reference.pixels)


def test_voi_lut_output_range_and_direction_are_the_lut_own(tmp_path):
    # A decreasing LUT that declares 16 bits but uses 12: display must span 0..255, inverted.
    ds = pydicom.dcmread(_testdata("vlut_04.dcm"))
    stored = ds.pixel_array.astype(np.int64)
    ds.VOILUTSequence[0].LUTData = [4095 - 16 * value for value in range(256)]
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    decoded = read_image(path)
    assert decoded.info["windowing"] == "voi_lut"
    np.testing.assert_array_equal(decoded.pixels, 255 - stored)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_eight_bit_without_window_is_shown_as_stored(tmp_path, photometric):
    # Secondary captures and scanned film are display-ready: stretching them would make the
    # DICOM look different from the same image exported as PNG.
    stored = (np.arange(64 * 80) % 200 + 20).astype(np.uint8).reshape(64, 80)
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.set_pixel_data(stored, photometric, 8)
    path = tmp_path / "capture.dcm"
    ds.save_as(path)
    decoded = read_image(path)
    assert decoded.info["windowing"] == "none" and decoded.info["bits"] == 8
    expected = stored if photometric == "MONOCHROME2" else 255 - stored
    np.testing.assert_array_equal(decoded.pixels, expected)


def test_enhanced_ct_uses_window_and_rescale_from_functional_groups():
    path = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    decoded = read_image(path)
    assert decoded.info["frames"] == 2 and decoded.info["frame"] == 1
    assert decoded.info["windowing"] == "window"
    hounsfield = ds.pixel_array[1].astype(np.float64) - 1024  # shared group: slope 1, -1024
    np.testing.assert_array_equal(decoded.pixels, _standard_window(hounsfield, 49, 102))


def test_multiframe_picks_the_middle_frame_and_honours_frame():
    path = _testdata("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    middle = read_image(path)
    assert middle.info["frames"] == 10 and middle.info["frame"] == 5
    np.testing.assert_array_equal(middle.pixels, read_image(path, frame=5).pixels)
    # The display is a monotone function of the chosen frame's stored values, of no other.
    for index, decoded in ((5, middle), (0, read_image(path, frame=0))):
        order = np.argsort(frames[index].ravel(), kind="stable")
        assert (np.diff(decoded.pixels.ravel()[order].astype(int)) >= 0).all()
    assert not np.array_equal(read_image(path, frame=0).pixels, middle.pixels)
    with pytest.raises(ImageReadError, match="frame 99 is out of range.*0 to 9"):
        read_image(path, frame=99)


# --- DICOM: colour -----------------------------------------------------------------------------


def test_rgb_ultrasound_keeps_orientation_and_values():
    path = _testdata("US1_UNCR.dcm")
    decoded = read_image(path)
    assert decoded.pixels.shape == (480, 640, 3)
    assert decoded.info["channels"] == 3 and decoded.info["windowing"] == "none"
    np.testing.assert_array_equal(decoded.pixels, pydicom.dcmread(path).pixel_array)
    # Its lossless JPEG 2000 twin is stored as YBR_RCT and must come back as the same RGB.
    twin = read_image(_testdata("US1_J2KR.dcm"))
    assert twin.info["photometric"] == "YBR_RCT"
    np.testing.assert_array_equal(twin.pixels, decoded.pixels)


def test_ybr_full_is_returned_as_rgb():
    rgb = read_image(_testdata("SC_rgb.dcm")).pixels
    ybr = read_image(_testdata("SC_ybr_full_uncompressed.dcm"))
    assert ybr.info["photometric"] == "YBR_FULL"
    # Unconverted YCbCr would be off by ~100 levels; the 8-bit YCbCr round trip costs up to 6.
    difference = np.abs(ybr.pixels.astype(int) - rgb)
    assert difference.mean() < 1 and difference.max() <= 8


def test_palette_colour_is_expanded_to_rgb():
    path = _testdata("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    decoded = read_image(path)
    assert decoded.pixels.shape == (600, 800, 3) and decoded.info["photometric"] == "PALETTE COLOR"
    np.testing.assert_array_equal(decoded.pixels, apply_color_lut(ds.pixel_array, ds) >> 8)


# --- PNG / JPEG --------------------------------------------------------------------------------


def _save(tmp_path, name: str, image: Image.Image, **options) -> str:
    path = tmp_path / name
    image.save(path, **options)
    return str(path)


def test_png_keeps_height_and_width(tmp_path):
    gray = np.arange(30 * 50, dtype=np.uint8).reshape(30, 50)
    decoded = read_image(_save(tmp_path, "gray.png", Image.fromarray(gray)))
    np.testing.assert_array_equal(decoded.pixels, gray)
    assert decoded.info == {"format": "png", "height": 30, "width": 50, "channels": 1, "bits": 8}
    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    decoded = read_image(_save(tmp_path, "rgb.png", Image.fromarray(rgb)))
    np.testing.assert_array_equal(decoded.pixels, rgb)


@pytest.mark.parametrize("mode, channels", [("L", 1), ("LA", 1), ("1", 1), ("P", 3), ("RGBA", 3)])
def test_png_modes_become_gray_or_rgb(tmp_path, mode, channels):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    decoded = read_image(_save(tmp_path, "mode.png", Image.fromarray(rgb).convert(mode)))
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.shape == ((20, 30) if channels == 1 else (20, 30, 3))


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    upright = np.zeros((40, 60, 3), dtype=np.uint8)
    upright[:20, :30] = 255  # bright top-left quadrant
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": store it turned counter-clockwise
    path = _save(tmp_path, "rotated.jpg", Image.fromarray(np.rot90(upright)), quality=95,
                 exif=exif.tobytes())
    decoded = read_image(path)
    assert decoded.info["format"] == "jpeg" and decoded.pixels.shape == (40, 60, 3)
    assert decoded.pixels[:20, :30].mean() > 240
    for quadrant in (decoded.pixels[:20, 30:], decoded.pixels[20:, :30], decoded.pixels[20:, 30:]):
        assert quadrant.mean() < 15


def test_sixteen_bit_png_reports_bits_and_is_windowed(tmp_path):
    values = np.linspace(1000, 5000, 40 * 50).reshape(40, 50).astype(np.uint16)
    decoded = read_image(_save(tmp_path, "gray16.png", Image.fromarray(values)))
    assert decoded.info["bits"] == 16 and decoded.pixels.dtype == np.uint8
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255
    assert (np.diff(decoded.pixels.ravel().astype(int)) >= 0).all()
    # Pillow silently reduces 16-bit RGB to 8 bits; the source depth must still be reported.
    path = tmp_path / "rgb16.png"
    path.write_bytes(cv2.imencode(".png", np.full((8, 8, 3), 40000, np.uint16))[1].tobytes())
    assert read_image(path).info["bits"] == 16
    assert read_image(_save(tmp_path, "gray8.png", Image.fromarray(values.astype(np.uint8)))
                      ).info["bits"] == 8


def test_content_decides_the_format(tmp_path):
    png_named_jpg = _save(tmp_path, "really_png.jpg", Image.new("L", (5, 4)), format="PNG")
    assert read_image(png_named_jpg).info["format"] == "png"
    no_suffix = tmp_path / "IM0001"
    no_suffix.write_bytes(Path(_testdata("CT_small.dcm")).read_bytes())
    assert is_dicom(no_suffix) and read_image(no_suffix).info["format"] == "dicom"
    assert not is_dicom(png_named_jpg)
    assert is_dicom(tmp_path / "anything.DCM")  # suffix alone is enough to try DICOM
    assert ".dcm" in IMAGE_SUFFIXES and ".png" in IMAGE_SUFFIXES


# --- files that cannot be used ---------------------------------------------------------------


def _ct_bytes() -> bytes:
    return Path(_testdata("CT_small.dcm")).read_bytes()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8) + 7).save(buffer, "PNG")
    return buffer.getvalue()


_NOTES = b"Patient notes, not an image.\n" * 20


@pytest.mark.parametrize("name, content, reason", [
    ("empty.dcm", lambda: b"", "empty"),
    ("empty.png", lambda: b"", "empty"),
    ("cut.dcm", lambda: _ct_bytes()[:1000], "truncated"),
    ("cut_in_pixels.dcm", lambda: _ct_bytes()[:-5000], "truncated"),
    ("notes.png", lambda: _NOTES, "not a PNG, JPEG or DICOM image"),
    ("noise.jpg", lambda: np.random.default_rng(0).bytes(4000), "not a PNG, JPEG or DICOM image"),
    ("notes.dcm", lambda: _NOTES, "not a DICOM image"),
    ("cut.png", lambda: _png_bytes()[:60], "damaged or truncated"),
])
def test_bad_files_raise_with_the_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(ImageReadError, match=reason):
        read_image(path)


def test_missing_file_and_png_frame_raise(tmp_path):
    with pytest.raises(ImageReadError, match="cannot be opened"):
        read_image(tmp_path / "absent.png")
    path = _save(tmp_path, "one.png", Image.new("L", (4, 4)))
    with pytest.raises(ImageReadError, match="frame 1 is out of range"):
        read_image(path, frame=1)


def test_dicom_without_pixel_data_says_so(tmp_path):
    with pytest.raises(ImageReadError, match="no Pixel Data element"):
        read_image(_variant(tmp_path, "nopixels.dcm", PixelData=None))


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_compressed_dicom_says_truncated(tmp_path):
    path = tmp_path / "cut_j2k.dcm"
    path.write_bytes(Path(_testdata("RG3_J2KI.dcm")).read_bytes()[:50_000])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_damaged_codestream_size_is_refused_before_decoding(tmp_path):
    # A J2K header claiming a larger image made openjpeg allocate gigabytes before failing.
    ds = pydicom.dcmread(_testdata("RG3_J2KI.dcm"))
    data = bytearray(ds.PixelData)
    siz = data.find(b"\xff\x4f\xff\x51")
    data[siz + 8:siz + 12] = (3000).to_bytes(4, "big")  # Xsiz: width 3000 instead of 1760
    ds.PixelData = bytes(data)
    path = tmp_path / "bad_siz.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="1760 x 3000 pixels but the DICOM header says 1760"):
        read_image(path)


def test_missing_decoder_names_the_packages(monkeypatch):
    # Simulates an install without pylibjpeg: pydicom records plugins and their missing
    # packages on the decoder object (no public switch exists to disable one).
    decoder = get_decoder(JPEG2000)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable",
                        {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0")})
    with pytest.raises(ImageReadError, match="no decoder for it is installed.*pylibjpeg-openjpeg"):
        read_image(_testdata("RG3_J2KI.dcm"))


def test_transfer_syntax_pydicom_cannot_decode(tmp_path):
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([ds.PixelData])
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="cannot decode pixel data stored as 'MPEG2"):
        read_image(path)
