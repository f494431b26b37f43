"""`medfed simulate` end to end on real BreastMNIST through Flower's Simulation Engine, and the
one-line errors for bad input (which must leave no run directory behind)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from commands import TINY, medfed
import torch
import yaml

from medfed.common.config import DataConfig
from medfed.common.config_loading import from_dict
from medfed.common.dataset import load_splits
from medfed.common.inference import evaluate
from medfed.common.model import build_model
from medfed.common.transforms import build_transform

REPORT_KEYS = {"config", "dataset", "sites", "rounds", "final", "communication", "timing", "versions"}
SCALARS = {"accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auc"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, medmnist_dir):
    out = tmp_path_factory.mktemp("runs") / "breast"
    result = medfed("simulate", "--dataset", "breastmnist", "--sites", "3", "--alpha", "1.0",
                    "--rounds", "2", "--freeze", "2", "--seed", "0", *TINY, "--out", str(out),
                    "--compare", "federated", "--set", "simulation.cpus_per_site=1",
                    data_dir=medmnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    # The federated run's own report; the comparison report around it is tested in test_compare.
    federated = out / "seed-0" / "federated"
    return federated, json.loads((federated / "report.json").read_text()), result.stdout


def test_run_directory_is_complete(finished_run):
    federated, _, stdout = finished_run
    out = federated.parents[1]
    for name in ("config.yaml", "runs.json", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    for name in ("report.json", "report.md", "metrics.csv", "global_model.pt"):
        assert (federated / name).is_file(), name
    assert sorted(p.name for p in (out / "seed-0" / "sites").glob("*.npz")) == [f"site-{i}.npz" for i in range(3)]
    # Each virtual site's frozen-feature cache, beside its data (the head round trained on it).
    for i in range(3):
        assert list((out / "seed-0" / "sites" / f"site-{i}-state" / "features").glob("features-*.npy"))
    assert not out.with_name(out.name + ".incomplete").exists()
    assert "round   2/2" in stdout and "global test AUC" in stdout


def test_report_contract(finished_run, medmnist_dir):
    out, report, _ = finished_run
    assert REPORT_KEYS <= set(report)
    assert report["config"] == yaml.safe_load((out.parents[1] / "config.yaml").read_text())
    assert from_dict(report["config"]).federation.rounds == 2
    assert report["dataset"]["name"] == "breastmnist"
    assert report["dataset"]["classes"] == ["malignant", "normal, benign"]

    # Sites: every pooled official train+val image is at exactly one site.
    official = load_splits(medmnist_dir / "breastmnist.npz")
    sites = report["sites"]
    assert sorted(sites) == ["site-0", "site-1", "site-2"]
    assert sum(sum(s["n"].values()) for s in sites.values()) == len(official["train"]) + len(official["val"])
    for info in sites.values():
        for split, hist in info["label_histogram"].items():
            assert len(hist) == 2 and sum(hist) == info["n"][split]

    # Rounds: per-site train loss and per-site val/test metrics, every round.
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert set(r["train"]) == set(sites)
        assert all(np.isfinite(v["loss"]) and v["n"] == sites[s]["n"]["train"] for s, v in r["train"].items())
        assert set(r["evaluate"]) == set(sites)
        for site, splits in r["evaluate"].items():
            assert splits["test"]["n"] == sites[site]["n"]["test"]
            assert SCALARS <= set(splits["val"])
        assert r["global_test"]["n"] == len(official["test"])

    final = report["final"]
    assert final["global"]["n"] == len(official["test"])
    assert np.asarray(final["global"]["confusion_matrix"]).sum() == len(official["test"])
    assert set(final["sites"]) == set(sites)
    for site, metrics in final["sites"].items():
        assert metrics["n"] == sites[site]["n"]["test"]
        assert 0.0 <= metrics["accuracy"] <= 1.0

    comm = report["communication"]
    assert 0 < comm["trainable_params"] < comm["total_params"]
    for direction in ("bytes_up_per_round", "bytes_down_per_round"):
        assert [r["round"] for r in comm[direction]] == [1, 2]
        for r in comm[direction]:
            assert set(r["sites"]) == set(sites)
    # One message per site and round: round 1 (the head stage) carries the classifier alone both
    # ways (and down the features' center for the head's start from class means), round 2
    # (fine-tuning) the trainable part, plus, down, the last round's evaluation.
    up = {r["round"]: set(r["sites"].values()) for r in comm["bytes_up_per_round"]}
    down = {r["round"]: set(r["sites"].values()) for r in comm["bytes_down_per_round"]}
    assert up[1] == {comm["head_payload_bytes"]}
    assert down[1] == {comm["head_payload_bytes"] + comm["head_center_bytes"]}
    # The center is one feature vector: half the two-class head's weights.
    assert 0.4 * comm["head_payload_bytes"] < comm["head_center_bytes"] < comm["head_payload_bytes"]
    assert comm["head_start_bytes"]["up"] > 0 and comm["head_start_bytes"]["down"] > 0
    assert up[2] == {comm["payload_bytes"]} and down[2] == {2 * comm["payload_bytes"]}
    assert comm["head_payload_bytes"] < comm["payload_bytes"] / 10
    # Only the trainable part travels: well under the full float32 model.
    assert comm["payload_bytes"] < 4 * comm["total_params"]
    assert report["timing"]["wall_s"] > 0
    assert report["versions"]["flwr"].startswith("1.42")


def test_metrics_csv_has_a_row_per_round_site_split(finished_run):
    out, report, _ = finished_run
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for r in (1, 2):
        for site in report["sites"]:
            for split in ("train", "val", "test"):
                assert any(x["round"] == str(r) and x["site"] == site and x["split"] == split for x in rows)
    finals = [x for x in rows if x["round"] == "final"]
    assert {x["site"] for x in finals} == {*report["sites"], "global"}


def test_checkpoint_reproduces_the_reported_global_metrics(finished_run, medmnist_dir):
    out, report, _ = finished_run
    checkpoint = torch.load(out / "global_model.pt", weights_only=False)
    config = from_dict(checkpoint["config"])
    model = build_model(config.model, num_classes=2, seed=config.seed)
    model.load_state_dict(checkpoint["model"])
    test = load_splits(medmnist_dir / "breastmnist.npz")["test"]
    metrics = evaluate(model, test, transform=build_transform(model, DataConfig(image_size=32), train=False),
                       batch_size=32, device=torch.device("cpu"))
    assert metrics["auc"] == pytest.approx(report["final"]["global"]["auc"], abs=1e-6)
    assert metrics["confusion_matrix"] == report["final"]["global"]["confusion_matrix"]


def test_report_markdown_names_every_site(finished_run):
    out, report, _ = finished_run
    text = (out / "report.md").read_text()
    for site in report["sites"]:
        assert f"| {site} |" in text
    assert "MedMNIST v2" in text


BAD_INPUT = [
    (["--dataset", "nosuchmnist"], "data.dataset"),
    (["--backbone", "resnet_nonexistent"], "unknown backbone"),
    (["--strategy", "fedmagic"], "federation.strategy"),
    (["--alpha", "0"], "partition.alpha"),
    (["--sites", "40"], "too few examples"),
    (["--image-size", "16"], "data.image_size"),
    (["--set", "federation.nonsense=1"], "federation.nonsense"),
    (["--set", "federation.rounds=many"], "federation.rounds"),
    (["--freeze", "99"], "--freeze"),
    (["--dataset", "dermamnist"], "dermamnist.npz is missing"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUT, ids=[a[1] for a, _ in BAD_INPUT])
def test_bad_input_gives_one_clear_line_and_no_run_directory(args, expected, tmp_path, medmnist_dir):
    out = tmp_path / "run"
    base = ["simulate", "--dataset", "breastmnist", *TINY, "--out", str(out)]
    result = medfed(*base, *args, data_dir=medmnist_dir, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists() and not out.with_name("run.incomplete").exists()


def test_corrupt_npz_is_named(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file")
    result = medfed("simulate", "--dataset", "breastmnist", *TINY, "--out", str(tmp_path / "run"),
                    data_dir=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "breastmnist.npz is not a readable MedMNIST npz" in result.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_config_with_unknown_key(tmp_path, medmnist_dir):
    config = tmp_path / "c.yaml"
    config.write_text("federation:\n  rounds: 3\n  rouns: 4\n")
    result = medfed("simulate", "--config", str(config), data_dir=medmnist_dir, timeout=120)
    assert result.returncode == 2
    assert "unknown key 'federation.rouns'" in result.stderr


def test_existing_output_directory_is_refused(tmp_path, medmnist_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = medfed("simulate", "--dataset", "breastmnist", *TINY, "--out", str(out),
                    data_dir=medmnist_dir, timeout=120)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "report.json").read_text() == "{}"
