"""Checkpoints and resume: a run stopped after round 2 and resumed ends exactly where an
uninterrupted run ends (real BreastMNIST, Flower's Simulation Engine, CPU, same seeds)."""

from __future__ import annotations

import copy

import pytest
import torch

from medfed.common.config import Config
from medfed.common.errors import MedfedError
from medfed.server.checkpoint import CHECKPOINT, load_checkpoint
from medfed.simulations.run import prepare, run_federation, save_sites


@pytest.fixture(scope="module")
def prepared(medmnist_dir, tmp_path_factory):
    config = Config()
    config.data.dataset, config.data.data_dir, config.data.image_size = "breastmnist", str(medmnist_dir), 32
    config.model.backbone, config.model.weights, config.model.freeze = "test_efficientnet", "none", "2"
    config.partition.sites, config.partition.alpha = 2, 1.0
    config.federation.strategy, config.federation.server_lr = "fedadam", 0.01
    prepared = prepare(config)
    sites_dir = tmp_path_factory.mktemp("sites")
    save_sites(prepared, sites_dir)
    return prepared, sites_dir


def _run(prepared, run_dir, *, rounds, resume=False):
    data, sites_dir = prepared
    report = run_federation(data, _config(prepared, rounds), run_dir=run_dir, sites_dir=sites_dir,
                            progress=lambda line: None, resume=resume)
    return report, torch.load(run_dir / "global_model.pt", weights_only=False)["model"]


def test_resumed_run_equals_uninterrupted_run(prepared, tmp_path):
    whole_report, whole = _run(prepared, tmp_path / "whole", rounds=4)
    _run(prepared, tmp_path / "split", rounds=2)
    assert load_checkpoint(tmp_path / "split", config_json=_config(prepared, 4).to_json())["round"] == 2
    resumed_report, resumed = _run(prepared, tmp_path / "split", rounds=4, resume=True)
    assert resumed_report["timing"]["resumed_from_round"] == 2
    assert [r["round"] for r in resumed_report["rounds"]] == [1, 2, 3, 4]
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert resumed_report["final"]["global"] == whole_report["final"]["global"]


def test_resume_refuses_another_study(prepared, tmp_path):
    _run(prepared, tmp_path / "run", rounds=1)
    data, _ = prepared
    other = copy.deepcopy(data.config)
    other.train.lr = 0.5
    with pytest.raises(MedfedError, match="another config"):
        load_checkpoint(tmp_path / "run", config_json=other.to_json())
    with pytest.raises(MedfedError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing", config_json=other.to_json())
    assert (tmp_path / "run" / CHECKPOINT).is_file()


def _config(prepared, rounds):
    config = copy.deepcopy(prepared[0].config)
    config.federation.rounds = rounds
    return config
