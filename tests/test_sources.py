"""A hospital's folder or manifest, listed, decoded and resized, with every problem named."""

from __future__ import annotations

import numpy as np
import pytest
from imagefiles import gradient, write_dicom, write_jpeg, write_png

from medfed.common.errors import MedfedError
from medfed.common.sources import discover, load
from medfed.common.splits import split_indices


@pytest.fixture
def mixed_folder(tmp_path):
    """normal/: 3 PNG + 1 JPEG; pneumonia/: 2 PNG + 2 DICOM (two patients) + a README."""
    root = tmp_path / "cxr"
    for i in range(3):
        write_png(root / "normal" / f"n{i}.png", gradient(i))
    write_jpeg(root / "normal" / "n3.jpg", gradient(3))
    for i in range(2):
        write_png(root / "pneumonia" / f"p{i}.png", gradient(10 + i))
    write_dicom(root / "pneumonia" / "scans" / "d0.dcm", gradient(20, dtype=np.uint16), patient_id="A")
    write_dicom(root / "pneumonia" / "scans" / "d1", gradient(21, dtype=np.uint16), patient_id="B")
    (root / "pneumonia" / "README.txt").write_text("exported from PACS")
    return root


def test_folder_lists_classes_and_mixed_formats(mixed_folder):
    collection = discover(mixed_folder)
    assert collection.kind == "folder"
    assert collection.classes == ["normal", "pneumonia"]
    names = sorted(r.path.name for r in collection.records)
    # A DICOM file without a suffix is found by its content; the README is not an image.
    assert names == ["d0.dcm", "d1", "n0.png", "n1.png", "n2.png", "n3.jpg", "p0.png", "p1.png"]
    assert collection.ignored == ["pneumonia/README.txt"]
    assert collection.problems == []


def test_load_resizes_and_labels(mixed_folder):
    loaded = load(discover(mixed_folder), image_size=32)
    assert loaded.images.images.shape == (8, 32, 32) and loaded.images.images.dtype == np.uint8
    assert sorted(loaded.images.labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    # DICOM PatientID is the patient; images without one are each their own patient.
    assert loaded.patients is not None
    assert {"A", "B"} <= set(loaded.patients)
    assert len(set(loaded.patients)) == 8
    assert loaded.sites is None and loaded.skipped == []


def test_rgb_image_makes_the_collection_rgb(mixed_folder):
    write_png(mixed_folder / "normal" / "colour.png", np.stack([gradient(30)] * 3, axis=2))
    loaded = load(discover(mixed_folder), image_size=32)
    assert loaded.images.images.shape == (9, 32, 32, 3)


def test_bad_files_refuse_with_names_or_are_skipped(mixed_folder):
    (mixed_folder / "normal" / "notes.png").write_text("this is text, not a PNG")
    truncated = mixed_folder / "pneumonia" / "cut.dcm"
    full = write_dicom(mixed_folder / "tmp.dcm", gradient(40, dtype=np.uint16)).read_bytes()
    truncated.write_bytes(full[:400])
    (mixed_folder / "tmp.dcm").unlink()
    collection = discover(mixed_folder)
    with pytest.raises(MedfedError) as error:
        load(collection, image_size=32)
    message = str(error.value)
    assert "2 problem(s)" in message and "notes.png" in message and "cut.dcm" in message
    assert "--skip-bad" in message and "medfed data check" in message
    loaded = load(collection, image_size=32, skip_bad=True)
    assert len(loaded.images) == 8
    assert sorted(p.file for p in loaded.skipped) == ["normal/notes.png", "pneumonia/cut.dcm"]


def test_empty_class_folder_is_a_problem(mixed_folder):
    (mixed_folder / "covid").mkdir()
    collection = discover(mixed_folder)
    assert [(p.file, "empty" in p.reason) for p in collection.problems] == [("covid/", True)]


def _manifest(path, rows, header="path,label,site,patient_id"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_manifest_with_sites_and_patients(mixed_folder):
    rows = [f"cxr/normal/n{i}.png,normal,{'north' if i < 2 else 'south'},N{i}" for i in range(3)]
    rows += ["cxr/pneumonia/p0.png,pneumonia,north,A", "cxr/pneumonia/scans/d0.dcm,pneumonia,south,A"]
    manifest = _manifest(mixed_folder.parent / "study.csv", rows)
    collection = discover(manifest)
    assert collection.kind == "manifest" and collection.classes == ["normal", "pneumonia"]
    loaded = load(collection, image_size=32)
    assert loaded.sites.tolist() == ["north", "north", "south", "north", "south"]
    assert loaded.patients.tolist() == ["N0", "N1", "N2", "A", "A"]


def test_manifest_problems_are_named(mixed_folder):
    rows = ["cxr/normal/n0.png,normal,north,N0", "cxr/normal/gone.png,normal,north,N1",
            "cxr/pneumonia/p0.png,,north,N2", "cxr/pneumonia/p1.png,covid,south,N3",
            "cxr/normal/n1.png,normal,south,N4"]
    manifest = _manifest(mixed_folder.parent / "study.csv", rows)
    collection = discover(manifest, classes=["normal", "pneumonia"])
    reasons = {p.file: p.reason for p in collection.problems}
    assert "file not found" in reasons["cxr/normal/gone.png"]
    assert "empty label" in reasons["study.csv line 4"]
    assert "'covid' is not one of the classes" in reasons["cxr/pneumonia/p1.png"]
    assert [r.path.name for r in collection.records] == ["n0.png", "n1.png"]


@pytest.mark.parametrize("header, match", [
    ("file,diagnosis", "lacks column.*path, label"),
    ("path,label", "no rows"),
])
def test_unusable_manifest_is_one_clear_error(tmp_path, header, match):
    manifest = tmp_path / "m.csv"
    manifest.write_text(header + "\n" + ("a.png,x\n" if "file" in header else ""))
    with pytest.raises(MedfedError, match=match):
        discover(manifest)


def test_folder_without_class_subfolders(tmp_path):
    write_png(tmp_path / "flat" / "a.png", gradient(0))
    with pytest.raises(MedfedError, match="one subfolder per class|subfolder named after the class"):
        discover(tmp_path / "flat")
    with pytest.raises(MedfedError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_a_site_with_one_class_loads_under_the_federation_class_list(tmp_path):
    """Non-IID hospitals may hold one class; labels follow the federation's list, not the folder's."""
    for i in range(3):
        write_png(tmp_path / "d" / "pneumonia" / f"{i}.png", gradient(i))
    loaded = load(discover(tmp_path / "d", classes=["normal", "pneumonia"]), image_size=32)
    assert loaded.classes == ["normal", "pneumonia"]
    assert loaded.images.labels.tolist() == [1, 1, 1]


def test_dicom_series_split_keeps_each_patient_on_one_side(tmp_path):
    """A generated DICOM series: 10 patients with 3 images each; PatientID drives the split."""
    root = tmp_path / "series"
    for patient in range(10):
        label = "effusion" if patient % 2 else "normal"
        for image in range(3):
            write_dicom(root / label / f"P{patient}-{image}.dcm",
                        gradient(patient * 10 + image, dtype=np.uint16), patient_id=f"P{patient}")
    loaded = load(discover(root), image_size=32)
    assert sorted(set(loaded.patients)) == [f"P{i}" for i in range(10)]
    split = split_indices(loaded.images.labels, seed=0, groups=loaded.patients)
    sides = {name: set(loaded.patients[index]) for name, index in split.items()}
    assert all(sides.values())
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"]
                or sides["val"] & sides["test"])
