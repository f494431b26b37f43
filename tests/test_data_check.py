"""`medfed data check`: a site's verdict on its own data, each problem named with its file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from commands import medfed
from imagefiles import gradient, write_dicom, write_png

from medfed.client.data_check import check


@pytest.fixture
def clean_folder(tmp_path):
    root = tmp_path / "site"
    for i in range(12):
        write_png(root / "benign" / f"b{i}.png", gradient(i))
        write_png(root / "malignant" / f"m{i}.png", gradient(100 + i))
    return root


def test_clean_folder_is_usable_and_summarised(clean_folder, tmp_path):
    result = medfed("data", "check", str(clean_folder), "--out", "summary.json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: usable" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["usable"] and summary["errors"] == []
    assert summary["classes"] == {"benign": 12, "malignant": 12}
    assert summary["files"] == {"listed": 24, "readable": 24, "unusable": 0, "ignored": 0}
    assert summary["images"]["sizes"] == [{"height": 40, "width": 48, "count": 24}]
    assert summary["images"]["bits"] == {"8": 24}
    # No patient ids anywhere: the risk cannot be judged, and the summary says so.
    assert summary["patients"]["risk"] == "unknown"
    assert any("no patient ids" in w for w in summary["warnings"])


def test_every_bad_input_is_listed_by_file(clean_folder, tmp_path):
    (clean_folder / "benign" / "report.png").write_text("radiology report, not an image")
    full = write_dicom(tmp_path / "full.dcm", gradient(50, dtype=np.uint16)).read_bytes()
    (clean_folder / "malignant" / "cut.dcm").write_bytes(full[: len(full) // 3])
    no_pixels = write_dicom(tmp_path / "nopix.dcm", gradient(51, dtype=np.uint16))
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(clean_folder / "malignant" / "nopix.dcm")
    (clean_folder / "normal").mkdir()
    write_png(clean_folder / "benign" / "deep.png", gradient(60, dtype=np.uint16))

    result = medfed("data", "check", str(clean_folder), "--out", "s.json", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT usable" in result.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    problems = {p["file"]: p["reason"] for p in summary["problems"]}
    assert set(problems) == {"benign/report.png", "malignant/cut.dcm", "malignant/nopix.dcm", "normal/"}
    assert "pixel data" in problems["malignant/nopix.dcm"].lower()
    assert "empty" in problems["normal/"]
    # The 16-bit PNG among 8-bit ones is readable but named in a warning.
    assert any("mixed bit depths" in w and "benign/deep.png" in w for w in summary["warnings"])
    for name in problems:
        assert name in result.stdout


def test_duplicates_within_and_across_labels(clean_folder):
    shutil.copy(clean_folder / "benign" / "b0.png", clean_folder / "benign" / "copy.png")
    summary = check(clean_folder)
    assert summary["usable"]
    assert summary["duplicates"] == [["benign/b0.png", "benign/copy.png"]]
    shutil.copy(clean_folder / "benign" / "b1.png", clean_folder / "malignant" / "b1-again.png")
    summary = check(clean_folder)
    assert not summary["usable"]
    assert ["benign/b1.png", "malignant/b1-again.png"] in summary["duplicates"]
    assert any("different labels" in e for e in summary["errors"])


def test_manifest_patients_sites_and_leakage(tmp_path):
    rows = ["path,label,site,patient_id"]
    for i in range(16):
        label = "benign" if i % 2 else "malignant"
        write_png(tmp_path / "img" / f"{i}.png", gradient(i))
        rows.append(f"img/{i}.png,{label},{'north' if i < 8 else 'south'},P{i // 2}")
    # Patient P3 was also imaged at the other hospital.
    write_png(tmp_path / "img" / "extra.png", gradient(99))
    rows.append("img/extra.png,benign,south,P3")
    manifest = tmp_path / "study.csv"
    manifest.write_text("\n".join(rows) + "\n")
    summary = check(manifest)
    assert summary["sites"] == {"north": {"benign": 4, "malignant": 4},
                                "south": {"benign": 5, "malignant": 4}}
    patients = summary["patients"]
    assert patients["source"] == "manifest patient_id" and patients["count"] == 8
    assert patients["several_sites"] == ["P3"] and patients["risk"] == "high"
    # Every patient here has one benign and one malignant image: flagged for a label review.
    assert len(patients["several_labels"]) == 8


def test_real_dicom_summary(tmp_path):
    data = pytest.importorskip("pydicom.data")
    root = tmp_path / "dicom"
    for name, label in [("CT_small.dcm", "ct"), ("MR_small.dcm", "mr"), ("emri_small.dcm", "mr"),
                        ("US1_UNCR.dcm", "us"), ("RG3_J2KI.dcm", "cr")]:
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(data.get_testdata_file(name), root / label / name)
    summary = check(root)
    assert summary["files"]["readable"] == 5 and summary["problems"] == []
    dicom = summary["dicom"]
    assert dicom["modality"] == {"CT": 1, "MR": 2, "US": 1, "CR": 1}
    assert dicom["photometric"]["MONOCHROME1"] == 1 and dicom["photometric"]["RGB"] == 1
    assert any("2000" in syntax for syntax in dicom["transfer_syntax"])
    assert summary["images"]["channels"] == {"1": 4, "3": 1}


def test_missing_path_is_one_clear_error(tmp_path):
    result = medfed("data", "check", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data-check.json").exists()


def test_too_few_patients_for_a_patient_level_split_is_not_usable(tmp_path):
    """Copies of one radiograph share its PatientID: training would refuse to split them, so the
    check, which `medfed client` runs before joining, says so first."""
    data = pytest.importorskip("pydicom.data")
    for i in range(10):
        folder = tmp_path / "cr" / ("normal" if i % 2 else "pneumonia")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(data.get_testdata_file("RG3_J2KI.dcm"), folder / f"{i}.dcm")
    summary = check(tmp_path / "cr")
    assert not summary["usable"]
    assert any("only 1 patient(s)" in e and "at least 7" in e for e in summary["errors"])
