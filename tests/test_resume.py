"""Checkpoints and resume: a run stopped after round 2 and resumed ends exactly where an
uninterrupted run ends, across the switch from the head stage to fine-tuning (real BreastMNIST,
Flower's Simulation Engine, CPU, same seeds)."""

from __future__ import annotations

import copy

import pytest
import torch

from medfed.common.config import Config
from medfed.common import wire
from medfed.common.errors import MedfedError
from medfed.common.model import build_model
from medfed.common.schedule import FINETUNE, HEAD, STAGES
from medfed.server.checkpoint import CHECKPOINT, load_checkpoint
from medfed.simulations.run import prepare, run_federation, save_sites

from commands import TINY_WEIGHTS


@pytest.fixture(scope="module")
def prepared(medmnist_dir, tmp_path_factory):
    config = Config()
    config.data.dataset, config.data.data_dir, config.data.image_size = "breastmnist", str(medmnist_dir), 32
    config.model.backbone, config.model.weights, config.model.freeze = (
        "test_efficientnet", TINY_WEIGHTS, "2")
    # Rounds 1-2 train the head on cached features; the run is stopped after round 2, the resumed
    # run switches to fine-tuning (the server optimizer restarts, only then do more keys travel).
    config.federation.head_rounds = 2
    config.partition.sites, config.partition.alpha = 2, 1.0
    config.federation.strategy, config.federation.server_lr = "fedadam", 0.01
    prepared = prepare(config)
    sites_dir = tmp_path_factory.mktemp("sites")
    save_sites(prepared, sites_dir)
    return prepared, sites_dir, config


def _run(prepared, run_dir, *, rounds, resume=False, progress=lambda line: None):
    data, sites_dir, _ = prepared
    report = run_federation(data, _config(prepared, rounds), run_dir=run_dir, sites_dir=sites_dir,
                            progress=progress, resume=resume)
    return report, torch.load(run_dir / "global_model.pt", weights_only=False)["model"]


class Stop(Exception):
    pass


def _stop_in_round_3(line: str) -> None:
    # Printed once round 3's replies are in, after round 2's checkpoint was written: the server
    # dies as a killed process would, mid-round.
    if line.startswith("round   3/4"):
        raise Stop(line)


@pytest.fixture(scope="module")
def whole(prepared, tmp_path_factory):
    """An uninterrupted 4-round run, shared by the tests that read it (each run starts Ray)."""
    return _run(prepared, tmp_path_factory.mktemp("whole"), rounds=4)


@pytest.fixture(scope="module")
def split(prepared, tmp_path_factory):
    """The same run stopped in round 3 and resumed: its directory, checkpoint round and result."""
    run_dir = tmp_path_factory.mktemp("split")
    with pytest.raises(Stop):
        _run(prepared, run_dir, rounds=4, progress=_stop_in_round_3)
    stopped_at = load_checkpoint(run_dir, config_json=_config(prepared, 4).to_json())["round"]
    return run_dir, stopped_at, _run(prepared, run_dir, rounds=4, resume=True)


def test_resumed_run_equals_uninterrupted_run(whole, split):
    whole_report, whole_model = whole
    _, stopped_at, (resumed_report, resumed) = split
    assert stopped_at == 2
    assert resumed_report["timing"]["resumed_from_round"] == 2
    assert [r["round"] for r in resumed_report["rounds"]] == [1, 2, 3, 4]
    assert resumed.keys() == whole_model.keys()
    for key in whole_model:
        assert torch.equal(resumed[key], whole_model[key]), key
    assert resumed_report["final"]["global"] == whole_report["final"]["global"]


def test_resume_refuses_another_study(prepared, split, tmp_path):
    run_dir = split[0]
    other = copy.deepcopy(prepared[2])
    other.train.lr = 0.5
    with pytest.raises(MedfedError, match="another config"):
        load_checkpoint(run_dir, config_json=other.to_json())
    with pytest.raises(MedfedError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing", config_json=other.to_json())
    assert (run_dir / CHECKPOINT).is_file()


def _config(prepared, rounds):
    config = copy.deepcopy(prepared[2])
    config.federation.rounds = rounds
    config.federation.head_rounds = min(rounds, 2)
    return config


def test_each_stage_sends_its_own_keys_and_the_report_counts_them(prepared, whole):
    report, _ = whole
    config = _config(prepared, 4)
    model = build_model(config.model, num_classes=2, seed=config.seed)
    payload = {stage: wire.record_bytes(wire.to_record(model, wire.exchanged_keys(
        model, bn=config.model.bn, stage=stage))) for stage in STAGES}
    assert payload[HEAD] < payload[FINETUNE] / 10
    down = {r["round"]: r["sites"] for r in report["communication"]["bytes_down_per_round"]}
    up = {r["round"]: r["sites"] for r in report["communication"]["bytes_up_per_round"]}
    sites = sorted(report["sites"])
    # One message per site and round, each carrying its stage's arrays; the last round adds one
    # evaluation message of the final aggregate (a fine-tune-stage payload).
    assert down[1] == down[2] == dict.fromkeys(sites, payload[HEAD])
    assert up[1] == up[2] == dict.fromkeys(sites, payload[HEAD])
    assert down[3] == dict.fromkeys(sites, payload[FINETUNE])
    assert down[4] == dict.fromkeys(sites, 2 * payload[FINETUNE])
    assert up[3] == up[4] == dict.fromkeys(sites, payload[FINETUNE])
    # Every round's model was judged from the sites' own evaluations of it.
    assert all(set(r["evaluate"]) == set(sites) and r["val_loss"] is not None
               for r in report["rounds"])
