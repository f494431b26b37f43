"""`medfed simulate --data`: a hospital-style manifest of real BreastMNIST ultrasound images,
exported as PNG files, split naturally by its site column and trained through Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest
from commands import TINY, medfed
from imagefiles import write_png
from PIL import Image

from medfed.common.dataset import load_splits

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, medmnist_dir):
    """Every official BreastMNIST image as a PNG, listed in a manifest with a hospital each and a
    patient id shared by pairs of images (so the split must keep pairs together)."""
    root = tmp_path_factory.mktemp("breast-png")
    splits = load_splits(medmnist_dir / "breastmnist.npz")
    images = np.concatenate([d.images for d in splits.values()])
    labels = np.concatenate([d.labels for d in splits.values()])
    classes = ["malignant", "benign"]
    rng = np.random.default_rng(0)
    hospital = rng.integers(0, len(HOSPITALS), size=len(labels) // 2 + 1)
    rows = ["path,label,site,patient_id"]
    for i, (pixels, label) in enumerate(zip(images, labels)):
        write_png(root / "png" / f"{i:04d}.png", pixels)
        rows.append(f"png/{i:04d}.png,{classes[label]},{HOSPITALS[hospital[i // 2]]},P{i // 2}")
    manifest = root / "study.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return root, manifest, len(labels)


def test_natural_split_by_site_column(exported, tmp_path):
    root, manifest, total = exported
    out = tmp_path / "run"
    result = medfed("simulate", "--data", str(manifest), "--partition", "natural", "--rounds", "1",
                    "--freeze", "2", "--clahe", "--compare", "federated", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "seed-0" / "federated" / "report.json").read_text())
    assert sorted(report["sites"]) == list(HOSPITALS)
    assert sorted(report["final"]["sites"]) == list(HOSPITALS)
    assert report["dataset"]["source"] == "manifest"
    assert report["dataset"]["classes"] == ["benign", "malignant"]
    assert report["dataset"]["images"] == total and report["dataset"]["patients"] == (total + 1) // 2
    assert sum(sum(s["n"].values()) for s in report["sites"].values()) == total
    assert report["partition"]["site_split"].endswith("by patient")
    assert report["config"]["data"]["equalize"] == "clahe"
    # The global test set is the union of the sites' test splits.
    assert report["final"]["global"]["n"] == sum(s["n"]["test"] for s in report["sites"].values())
    # Grad-CAM shows the image as the site decoded it (before CLAHE, which only the model sees),
    # each pixel enlarged 7 times (32 -> 224 px) with nearest-neighbour, beside its overlay.
    evidence = json.loads((out / "report.json").read_text())
    entry = evidence["gradcam"][0]
    panel = np.asarray(Image.open(out / entry["file"]))
    left = panel[:, :224, 0]
    small = left[::7, ::7]
    assert np.array_equal(np.kron(small, np.ones((7, 7), dtype=np.uint8)), left)
    site = list(evidence["sites"]).index(entry["site"])
    decoded = load_splits(out / "seed-0" / "sites" / f"site-{site}.npz")["test"].images
    assert any(np.array_equal(small, image) for image in decoded)
    assert panel.shape[:2] == (224, 2 * 224 + 8)


def test_bad_files_refuse_then_skip(exported, tmp_path):
    root, manifest, _ = exported
    broken = root / "png" / "broken.png"
    broken.write_text("not an image")
    bad_manifest = root / "with-bad.csv"
    bad_manifest.write_text(manifest.read_text() + "png/broken.png,benign,hospital-a,P9999\n")
    out = tmp_path / "run"
    refused = medfed("simulate", "--data", str(bad_manifest), *TINY, "--out", str(out), timeout=300)
    assert refused.returncode == 2
    assert "png/broken.png" in refused.stderr and "--skip-bad" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not out.exists()
    skipped = medfed("simulate", "--data", str(bad_manifest), "--skip-bad", "--sites", "2",
                     "--rounds", "1", "--compare", "centralized", *TINY, "--out", str(out))
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "left out 1 unreadable file" in skipped.stdout
    assert json.loads((out / "report.json").read_text())["dataset"]["skipped_files"] == 1


def test_natural_needs_a_site_column(tmp_path, exported):
    root, manifest, _ = exported
    lines = manifest.read_text().splitlines()
    no_sites = root / "no-sites.csv"
    no_sites.write_text("\n".join(",".join(l.split(",")[:2]) for l in lines) + "\n")
    result = medfed("simulate", "--data", str(no_sites), "--partition", "natural", *TINY,
                    "--out", str(tmp_path / "run"), timeout=300)
    assert result.returncode == 2
    assert "needs a manifest with a 'site' column" in result.stderr
    assert not (tmp_path / "run").exists()
