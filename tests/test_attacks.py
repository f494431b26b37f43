"""Simulated attacks (`medfed simulate --attack KIND --attackers K`): the ClientApp mod against mock
Flower messages, label poisoning, the config's refusals, and one short run through Flower's
Simulation Engine whose report names the attacker."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from commands import TINY, medfed
from conftest import evaluation_record
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
# task_identity is test_strategy's autouse fixture: imported, it applies here too.
from test_strategy import task_identity

from medfed.client import app as medfed_client
from medfed.common.config import Config
from medfed.common.config_checks import check_deployment, check_sites, validate
from medfed.common.config_loading import set_value
from medfed.common.dataset import LabelledImages
from medfed.common.errors import MedfedError
from medfed.common.messages import EVALUATION
from medfed.simulations import attacks
from medfed.simulations.report import render_markdown

KEYS = ("head.weight", "head.bias", "bn.running_mean", "bn.running_var")


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = {"head.weight": rng.normal(size=(2, 8)), "head.bias": rng.normal(size=2),
              "bn.running_mean": rng.normal(size=8), "bn.running_var": rng.uniform(0.5, 2, size=8)}
    return {k: v.astype(np.float32) for k, v in values.items()}


def train_message(received: dict[str, np.ndarray], *, server_round: int = 3) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in received.items()}),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


def site_app(site: str, trained: dict[str, np.ndarray]):
    """What call_next stands for: the site's own train function replying with `trained` and its
    evaluation of the model it received."""
    def call_next(message: Message, context) -> Message:
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v.copy()) for k, v in trained.items()}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
            EVALUATION: evaluation_record(),
            "site": ConfigRecord({"name": site}),
        })
        return Message(content=content, reply_to=message)
    return call_next


def run_mod(kind: str, site: str, *, scale: float = 3.0, server_round: int = 3):
    received, trained = arrays(0), arrays(1)
    mod = attacks.UpdateAttack(kind=kind, scale=scale, sites=frozenset({"site-0", "site-1"}), seed=0)
    reply = mod(train_message(received, server_round=server_round), None, site_app(site, trained))
    sent = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    return received, trained, sent, reply


@pytest.mark.parametrize("kind", ["sign-flip", "scaled", "noise"])
def test_honest_sites_replies_pass_unchanged(kind):
    _, trained, sent, reply = run_mod(kind, "site-2")
    for key in KEYS:
        np.testing.assert_array_equal(sent[key], trained[key])
    assert reply.content["metrics"]["num-examples"] == 10
    assert dict(reply.content[EVALUATION].items()) == dict(evaluation_record().items())
    assert reply.content["site"]["name"] == "site-2"


@pytest.mark.parametrize("site", ["site-0", "site-1"])
def test_sign_flip_reverses_and_scales_the_attackers_update(site):
    received, trained, sent, reply = run_mod("sign-flip", site, scale=3.0)
    for key in ("head.weight", "head.bias"):
        expected = received[key] - 3.0 * (trained[key] - received[key])
        np.testing.assert_allclose(sent[key], expected, rtol=1e-5, atol=1e-5)
        assert sent[key].dtype == np.float32 and sent[key].shape == trained[key].shape
    for key in ("bn.running_mean", "bn.running_var"):  # statistics go back as trained
        np.testing.assert_array_equal(sent[key], trained[key])
    # Everything but the arrays is the site's own reply, its evaluation included.
    assert reply.content["metrics"]["train-loss"] == 0.5
    assert dict(reply.content[EVALUATION].items()) == dict(evaluation_record().items())
    assert set(reply.content.metric_records) == {"metrics", EVALUATION}
    assert reply.content["site"]["name"] == site


def test_scaled_multiplies_the_attackers_update():
    received, trained, sent, _ = run_mod("scaled", "site-0", scale=5.0)
    for key in ("head.weight", "head.bias"):
        np.testing.assert_allclose(sent[key] - received[key], 5.0 * (trained[key] - received[key]),
                                   rtol=1e-4, atol=1e-5)


def test_noise_replaces_the_update_by_noise_of_its_scale_reproducibly():
    received, trained, sent, _ = run_mod("noise", "site-0", scale=2.0)
    key = "head.weight"
    update, noise = trained[key] - received[key], sent[key] - received[key]
    assert not np.allclose(noise, update)
    # Standard deviation scale x the update's root mean square (16 draws: a loose bound).
    ratio = np.sqrt(np.mean(noise ** 2)) / np.sqrt(np.mean(update ** 2))
    assert 0.8 < ratio < 3.5
    np.testing.assert_array_equal(sent["bn.running_var"], trained["bn.running_var"])
    again = run_mod("noise", "site-0", scale=2.0)[2]
    np.testing.assert_array_equal(again[key], sent[key])  # same seed, round and site
    other_round = run_mod("noise", "site-0", scale=2.0, server_round=4)[2]
    assert not np.allclose(other_round[key], sent[key])


def test_the_mod_leaves_other_message_types_alone():
    mod = attacks.UpdateAttack(kind="sign-flip", scale=3.0, sites=frozenset({"site-0"}))
    message = Message(content=RecordDict({"config": ConfigRecord({})}),
                      message_type=MessageType.EVALUATE, dst_node_id=7)
    answer = Message(content=RecordDict({"site": ConfigRecord({"name": "site-0"})}), reply_to=message)
    assert mod(message, None, lambda m, c: answer) is answer


def test_the_attacking_client_app_is_built_for_simulation_only():
    config = Config()
    sites = [f"site-{i}" for i in range(5)]
    # medfed's own ClientApp, the one a SuperNode runs, carries no mods at all.
    assert medfed_client.app._mods == []
    assert attacks.client_app(config, sites) is medfed_client.app
    config.attack.kind, config.attack.sites = "label-flip", 2
    assert attacks.client_app(config, sites) is medfed_client.app  # poisons data, not replies
    config.attack.kind = "sign-flip"
    app = attacks.client_app(config, sites)
    assert app is not medfed_client.app
    assert set(app._registered_funcs) == {"train.default", "evaluate.default", "query.default"}
    assert attacks.attacker_sites(config, sites) == ["site-0", "site-1"]


def test_label_flip_poisons_only_the_attackers_training_labels():
    def split(labels):
        return LabelledImages(np.zeros((len(labels), 4, 4), np.uint8), np.asarray(labels, np.int64))

    sites = {f"site-{i}": {"train": split([0, 1, 2, 2]), "val": split([0, 1]), "test": split([2, 0])}
             for i in range(3)}
    config = Config()
    config.attack.kind, config.attack.sites = "label-flip", 1
    poisoned = attacks.poison_labels(sites, config, num_classes=3)
    assert poisoned["site-0"]["train"].labels.tolist() == [1, 2, 0, 0]
    assert poisoned["site-0"]["val"] is sites["site-0"]["val"]
    assert poisoned["site-0"]["test"] is sites["site-0"]["test"]
    assert poisoned["site-1"] is sites["site-1"] and poisoned["site-2"] is sites["site-2"]
    assert sites["site-0"]["train"].labels.tolist() == [0, 1, 2, 2]  # the input is not changed
    config.attack.kind = "sign-flip"
    assert attacks.poison_labels(sites, config, num_classes=3) is sites


# --- configuration -----------------------------------------------------------------------------

def configured(**values) -> Config:
    config = Config()
    for key, value in values.items():
        set_value(config, key.replace("__", "."), value)
    return config


@pytest.mark.parametrize("values, fragment", [
    ({"attack__kind": "poison"}, "'attack.kind' has invalid value 'poison'; allowed: none, sign-flip"),
    ({"attack__kind": "sign-flip"}, "'attack.sites' has invalid value 0; allowed: 1 or more attacking"),
    ({"attack__sites": 2}, "'attack.sites' has invalid value 2; allowed: 0 without an attack"),
    ({"attack__kind": "noise", "attack__sites": 1, "attack__scale": 0},
     "'attack.scale' has invalid value 0.0; allowed: a number > 0"),
    ({"federation__byzantine": -1}, "'federation.byzantine' has invalid value -1"),
    ({"federation__strategy": "trimmed"}, "allowed: fedavg, fedprox, fedadam, fedyogi, fedavgm, "
                                          "fedmedian, fedtrimmedavg, krum, multikrum, bulyan"),
])
def test_config_refuses_bad_attack_and_robustness_settings(values, fragment):
    with pytest.raises(MedfedError, match=re.escape(fragment)):
        validate(configured(**values))


def test_attackers_must_leave_an_honest_site():
    config = validate(configured(attack__kind="scaled", attack__sites=5))
    with pytest.raises(MedfedError, match=re.escape("'attack.sites' has invalid value 5; allowed: "
                                                    "1 to 4 attacking sites")):
        check_sites(config, sites=5)
    check_sites(validate(configured(attack__kind="scaled", attack__sites=4)), sites=5)


@pytest.mark.parametrize("strategy, byzantine, sites, needed", [
    ("krum", 1, 4, 5), ("multikrum", 2, 6, 7), ("bulyan", 1, 6, 7), ("bulyan", 0, 2, 3),
])
def test_robust_strategies_refuse_more_attackers_than_they_tolerate(strategy, byzantine, sites, needed):
    config = validate(configured(federation__strategy=strategy, federation__byzantine=byzantine))
    with pytest.raises(MedfedError) as info:
        check_sites(config, sites=sites)
    message = str(info.value)
    assert "\n" not in message
    assert f"federation.strategy={strategy} with federation.byzantine={byzantine} needs at least " \
           f"{needed} sites training each round" in message
    check_sites(config, sites=needed)


def test_fraction_train_counts_against_the_robust_minimum():
    config = validate(configured(federation__strategy="krum", federation__fraction_train=0.5))
    with pytest.raises(MedfedError, match="2 sampled per round"):
        check_sites(config, sites=5)


def test_a_deployed_study_refuses_an_attack_and_checks_min_sites():
    with pytest.raises(MedfedError, match="simulated attacks are for `medfed simulate` only"):
        check_deployment(configured(attack__kind="sign-flip", attack__sites=1), sites=5, min_sites=5)
    bulyan = configured(federation__strategy="bulyan", federation__byzantine=1)
    check_deployment(bulyan, sites=8, min_sites=7)
    with pytest.raises(MedfedError, match=re.escape("only 6 are sure to (--min-sites 6 of 8 sites)")):
        check_deployment(bulyan, sites=8, min_sites=6)


def test_simulate_refuses_impossible_robustness_before_any_run_directory(tmp_path):
    out = tmp_path / "run"
    result = medfed("simulate", "--dataset", "breastmnist", "--sites", "5", "--strategy", "bulyan",
                    "--set", "federation.byzantine=1", "--out", str(out), *TINY)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "needs at least 7 sites training each round (4f + 3)" in result.stderr
    assert not out.exists() and not out.with_name("run.incomplete").exists()


# --- end to end --------------------------------------------------------------------------------

def test_a_sign_flip_attack_runs_end_to_end_and_the_report_names_the_attacker(tmp_path, medmnist_dir):
    out = tmp_path / "attacked"
    # A large scale: the server's update-norm check must catch the attacker, which proves the
    # attack ran inside the Simulation Engine's ClientApp. Head only (--freeze all): no BatchNorm
    # statistics, whose change (left as trained) would otherwise weigh in the update norms.
    result = medfed("simulate", "--dataset", "breastmnist", "--sites", "3", "--alpha", "1.0",
                    "--rounds", "1", "--freeze", "all", "--seed", "0", *TINY, "--out", str(out),
                    "--compare", "federated", "--attack", "sign-flip", "--attackers", "1",
                    "--set", "attack.scale=100", "--set", "evidence.gradcam_per_class=0",
                    "--set", "evidence.bootstrap=100", data_dir=medmnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "simulated attack: sign-flip by 1 site (site-0)" in result.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["attack"]["kind"] == "sign-flip" and report["attack"]["sites"] == ["site-0"]
    assert report["sites"]["site-0"]["attacker"] is True
    assert "attacker" not in report["sites"]["site-1"] and "attacker" not in report["sites"]["site-2"]
    # Metrics at the attacker are still reported, and flagged in the readable report.
    assert report["runs"][0]["modes"]["federated"]["results"]["site-0"]["metrics"]["n"] > 0
    markdown = (out / "report.md").read_text()
    assert "Simulated attack: sign-flip by 1 site (site-0)" in markdown
    assert "site-0 (attacker)" in markdown and "site-1 (attacker)" not in markdown

    federated = json.loads((out / "seed-0" / "federated" / "report.json").read_text())
    rejected = federated["rounds"][0]["rejected"]
    assert len(rejected) == 1 and rejected[0].startswith("site-0: update norm"), rejected
    assert render_markdown(report)  # the report renders again from its own JSON
