"""`medfed bench`: medfed's recipe and full-model FedAvg on the same sites, as a user runs it."""

from __future__ import annotations

import json

from commands import TINY, medfed

from medfed.simulations.bench import QUANTITIES


def test_bench_runs_both_recipes_on_the_same_sites_and_prints_ratios(tmp_path, medmnist_dir):
    out = tmp_path / "bench"
    result = medfed("bench", "--dataset", "breastmnist", "--sites", "2", "--rounds", "2",
                    "--local-steps", "2", "--seeds", "0", *TINY, "--out", str(out),
                    data_dir=medmnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((out / "bench.json").read_text())
    assert [(r["recipe"], r["seed"]) for r in bench["runs"]] == [("medfed", 0), ("full-model", 0)]
    medfed_run, full = bench["runs"]
    # The head alone travels in medfed's recipe; every tensor in full-model FedAvg.
    assert medfed_run["bytes_up_per_round"] * 10 < full["bytes_up_per_round"]
    assert bench["summary"]["ratio"]["bytes_up_per_round"] < 0.1
    for run in bench["runs"]:
        assert 0.0 <= run["auc"] <= 1.0 and run["site_peak_mb"] > 0
        assert 0 < run["client_train_s"] < run["client_compute_s"]
    assert set(bench["summary"]["ratio"]) == set(QUANTITIES)
    assert "full-model FedAvg" in result.stdout and "ratio" in result.stdout
    # Both recipes read the very same site files.
    assert sorted(p.name for p in (out / "seed-0" / "sites").glob("*.npz")) == ["site-0.npz", "site-1.npz"]


def test_bench_refuses_bad_seeds_in_one_line(tmp_path):
    result = medfed("bench", "--seeds", "0,x", "--out", str(tmp_path / "b"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --seeds '0,x': expected comma-separated whole numbers of 0 or more, e.g. 0,1,2"]
    assert not (tmp_path / "b").exists()


def test_bench_against_no_dp_prices_differential_privacy_on_the_same_sites(tmp_path, medmnist_dir):
    out = tmp_path / "bench"
    result = medfed("bench", "--dataset", "breastmnist", "--sites", "2", "--rounds", "2",
                    "--local-steps", "2", "--seeds", "0", *TINY, "--dp", "sample", "--epsilon", "8",
                    "--against", "no-dp", "--out", str(out), data_dir=medmnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((out / "bench.json").read_text())
    assert [r["recipe"] for r in bench["runs"]] == ["medfed", "no-dp"]
    assert bench["config"]["privacy"]["dp"] == "sample"
    # The same recipe otherwise: the same bytes on the wire.
    assert bench["summary"]["ratio"]["bytes_up_per_round"] == 1.0
    assert "without DP" in result.stdout and "client training steps" in result.stdout
    private = json.loads((out / "seed-0" / "medfed" / "report.json").read_text())
    plain = json.loads((out / "seed-0" / "no-dp" / "report.json").read_text())
    assert private["privacy"]["sites"] and not plain["privacy"]["sites"]


def test_bench_against_no_dp_needs_a_dp_recipe(tmp_path):
    result = medfed("bench", "--against", "no-dp", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "add --dp sample" in result.stderr
    assert not (tmp_path / "b").exists()
