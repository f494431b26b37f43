"""`medfed simulate --compare`: every mode on the same split of real BreastMNIST, two seeds, the
statistics in the report, and `medfed report` rebuilding it exactly from the saved files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from browser import SCREEN, chromium, read_page
from commands import TINY, TINY_WEIGHTS, medfed

from medfed.common.metrics import PER_CLASS_SCALARS

MODES = ["federated", "centralized", "local", "scratch", "classical-svm-pixels",
         "classical-rf-pixels", "classical-svm-cnn", "classical-rf-cnn"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, medmnist_dir):
    out = tmp_path_factory.mktemp("compare") / "all-modes"
    result = medfed("simulate", "--dataset", "breastmnist", "--sites", "2", "--alpha", "1.0",
                    "--rounds", "1", "--seeds", "0,1", *TINY, "--out", str(out), "--compare", "all",
                    "--set", "evidence.bootstrap=200", data_dir=medmnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "report.json").read_text()), result.stdout


def test_every_mode_ran_on_the_same_split(comparison):
    out, report, _ = comparison
    assert report["modes"] == MODES
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    for run in report["runs"]:
        assert list(run["modes"]) == MODES
        with np.load(out / run["dir"] / "predictions.npz") as npz:
            predictions = dict(npz)
        for site in report["sites"]:
            truths = [v for k, v in predictions.items() if k.endswith(f"|{site}/test|y")]
            assert len(truths) == len(MODES)  # local contributes its own site model once
            for truth in truths[1:]:
                np.testing.assert_array_equal(truth, truths[0])
        global_truths = [v for k, v in predictions.items() if k.endswith("|global/test|y")]
        # One global model per mode, plus one local model per site.
        assert len(global_truths) == len(MODES) - 1 + len(report["sites"])
        for truth in global_truths[1:]:
            np.testing.assert_array_equal(truth, global_truths[0])


def test_results_carry_intervals_and_operating_points(comparison):
    _, report, _ = comparison
    first = report["runs"][0]["modes"]
    for mode in MODES:
        results = first[mode]["results"]
        assert set(results) == set(report["sites"]) | ({"global"} if mode != "local" else set())
        for result in results.values():
            metrics, ci = result["metrics"], result["ci"]
            if result["not_estimable"]:
                # A split with fewer than 5 images of a class (tiny BreastMNIST sites).
                assert result["not_estimable"].startswith("not estimable (")
                assert all(metrics[n] is None and ci[n] is None for n in PER_CLASS_SCALARS)
                assert result["operating_points"] is None and metrics["accuracy"] is not None
                continue
            for name in ("accuracy", "balanced_accuracy", "f1"):
                low, high = ci[name]
                assert low <= metrics[name] <= high, (mode, name)
            points = result["operating_points"]
            assert set(points) == {"youden_threshold", "at_0.5", "at_youden"}
    assert not first["federated"]["results"]["global"]["not_estimable"]
    assert set(first["local"]["local_on_global"]) == set(report["sites"])
    assert first["federated"]["results"]["global"]["roc"]["fpr"][0] == 0.0
    assert first["federated"]["bytes"]["up"] > 0 and first["centralized"]["bytes"] is None
    assert len(first["federated"]["history"]) == 1 and len(first["centralized"]["history"]) == 1


def test_report_states_the_statistics(comparison):
    _, report, stdout = comparison
    pairs = {(s["label_a"], s["label_b"]): s for s in report["statistics"]}
    for pair in [("federated", "local"), ("federated", "centralized"), ("federated", "scratch"),
                 ("federated", "classical-svm-pixels"), ("federated", "best local site")]:
        assert pair in pairs, pair
    site_level = pairs[("federated", "local")]
    # Two sites x two seeds, less any pair where a site's test split made AUC undefined.
    assert site_level["n"] + site_level.get("n_dropped", 0) == 4
    assert site_level["wins"] + site_level["ties"] + site_level["losses"] == site_level["n"]
    assert re.match(r"federated beats local at \d of \d", site_level["sentence"])
    assert pairs[("federated", "best local site")]["n"] == 2
    for mode in MODES:
        assert report["summary"][mode]["global"]["auc"]["n"] == 2
    assert site_level["sentence"] in stdout
    assert set(report["headline"]) >= {"federated_minus_centralized", "federated_minus_best_local",
                                       "pretrained_minus_scratch"}


def test_html_report_is_self_contained_with_gradcam(comparison):
    out, report, _ = comparison
    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"https?://", html)
    assert report["gradcam"], "no Grad-CAM overlay was produced"
    for entry in report["gradcam"]:
        assert (out / entry["file"]).is_file()
        assert entry["site"] in report["sites"]
    assert html.count("data:image/png;base64,") >= len(report["gradcam"])
    card = report["model_card"]
    assert card["backbone"] == "test_efficientnet" and card["weights_source"] == f"checkpoint {TINY_WEIGHTS}"
    assert card["input_size"] == 32 and len(card["mean"]) == 3


def test_the_real_report_reads_well_in_a_browser(comparison):
    """Opened in headless Chromium at 1400 x 900 (skipped where it is not installed): the
    verdicts and the forest plot on the first screen, every picture loaded, no console error."""
    out, report, _ = comparison
    session = chromium()
    try:
        page = read_page(session, out / "report.html", heading="The answer in brief",
                         plot="Global test AUC per mode")
    finally:
        session.quit()
    assert page["errors"] == []
    assert page["verdicts"] == 5 and 0 < page["verdicts_bottom"] <= SCREEN[1]
    assert page["plot_bottom"] is not None and page["plot_bottom"] <= SCREEN[1], page["plot_bottom"]
    assert all(i["complete"] and i["natural"] > 0 for i in page["images"])
    gradcams = [i for i in page["images"] if " Left: the image; right: Grad-CAM." in i["alt"]]
    assert len(gradcams) == len(report["gradcam"])
    # BreastMNIST's 28-pixel images: each panel enlarged 8 times, shown at its own size.
    assert all(i["natural"] == i["shown"] == 2 * 224 + 8 for i in gradcams)


def test_report_command_rebuilds_identically(comparison):
    out, _, _ = comparison
    before = {name: (out / name).read_bytes() for name in ("report.json", "report.md", "report.html")}
    (out / "report.json").unlink()
    result = medfed("report", str(out), data_dir=out, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name


def test_report_command_on_a_wrong_directory(tmp_path):
    result = medfed("report", str(tmp_path), data_dir=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "not a finished medfed comparison" in result.stderr and "Traceback" not in result.stderr


def test_data_efficiency_and_folds_without_flower(tmp_path, medmnist_dir):
    """Fractions of the training data and k-fold splits, on the modes that need no Flower."""
    out = tmp_path / "fractions"
    result = medfed("simulate", "--dataset", "breastmnist", "--sites", "2", "--alpha", "1.0",
                    "--rounds", "1", *TINY, "--compare", "centralized,local", "--folds", "2",
                    "--train-fraction", "0.5,1.0", "--out", str(out),
                    "--set", "evidence.bootstrap=100", "--set", "evidence.gradcam_per_class=0",
                    data_dir=medmnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert [(r["fold"], r["fraction"]) for r in report["runs"]] == [(0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]
    assert report["folds"] == 2 and set(report["data_efficiency"]["centralized"]) == {"0.5", "1"}
    runs = report["runs"]
    for site in report["sites"]:
        half = runs[0]["modes"]["centralized"]["results"][site]["metrics"]["n"]
        full = runs[1]["modes"]["centralized"]["results"][site]["metrics"]["n"]
        assert half == full  # test splits are untouched by the training fraction
    # Two folds: each site's two test folds are disjoint and together cover its non-train data.
    with np.load(out / runs[1]["dir"] / "predictions.npz") as first, \
            np.load(out / runs[3]["dir"] / "predictions.npz") as second:
        site = next(iter(report["sites"]))
        n_first = len(first[f"centralized|global|{site}/test|y"])
        n_second = len(second[f"centralized|global|{site}/test|y"])
    total = sum(report["sites"][site]["n"].values())
    assert n_first + n_second == total
