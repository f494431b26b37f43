"""Differential privacy: the plan each site decides, its run-long ledger, the budget stop, the
client-level wrapper, bad input, and — message by message — what leaves a site.

The site tests call medfed's real ClientApp in this process with the messages the server
builds, on a site holding real BreastMNIST images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from medfed.client.app import app as client_app
from medfed.common import messages, privacy, wire
from medfed.common.config import Config
from medfed.common.config_checks import validate
from medfed.common.config_loading import set_value
from medfed.common.dataset import load_splits, save_splits
from medfed.common.errors import MedfedError
from medfed.common.model import build_model, check_model
from medfed.common.schedule import FINETUNE, HEAD, PlateauSchedule, Stages
from medfed.server.aggregation import make_flower_strategy
from medfed.server.strategy import MedfedStrategy
from tests.commands import TINY_WEIGHTS
from tests.conftest import evaluation_record

CLASSES = ["malignant", "normal, benign"]
SITE = "hospital-a"


@pytest.fixture(autouse=True)
def task_identity():
    # Messages need a run identity, which Flower sets in a real ServerApp process.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _config(**privacy_settings) -> Config:
    config = Config()
    config.model.backbone, config.model.weights = "test_efficientnet", TINY_WEIGHTS
    config.data.image_size, config.train.device = 32, "cpu"
    config.train.local_steps, config.federation.rounds = 4, 3
    for key, value in privacy_settings.items():
        setattr(config.privacy, key, value)
    return validate(config)


@pytest.fixture(scope="module")
def site_file(tmp_path_factory, medmnist_dir):
    """One hospital's share of real BreastMNIST (28 px) with its own train/val/test."""
    splits = load_splits(medmnist_dir / "breastmnist.npz")
    path = tmp_path_factory.mktemp("site") / f"{SITE}.npz"
    save_splits(path, {"train": splits["train"].subset(np.arange(60)),
                       "val": splits["val"].subset(np.arange(20)),
                       "test": splits["test"].subset(np.arange(20))})
    return path


def _message(config: Config, *, server_round: int, kind: str = MessageType.TRAIN,
             stage: str = HEAD, study: str = "study-1") -> Message:
    model = build_model(config.model, num_classes=2, seed=config.seed)
    keys = wire.exchanged_keys(model, bn=config.model.bn, stage=stage)
    round_config = messages.round_config(config, classes=CLASSES, study=study)
    sent = messages.with_round_values(ConfigRecord(), {**round_config, "server-round": server_round},
                                      lr=1e-2, stage=stage)
    return Message(content=RecordDict({messages.ARRAYS: wire.to_record(model, keys),
                                       messages.CONFIG: sent}),
                   dst_node_id=1, message_type=kind)


def _context(site_file, state_dir) -> Context:
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                   node_config={"site": SITE, "data-path": str(site_file),
                                "state-dir": str(state_dir)})


def _reply(config, site_file, state_dir, **message) -> Message:
    reply = client_app(_message(config, **message), _context(site_file, state_dir))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


# --- the plan ------------------------------------------------------------------------------------

def test_the_noise_is_decided_for_the_budget_over_the_planned_run():
    config = _config(dp="sample", epsilon=3.0)
    plan = privacy.site_plan(config, examples=100)
    assert plan.planned_steps == 3 * 4 and plan.sample_rate == pytest.approx(1 / 4)
    spent = privacy.epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)],
                               delta=plan.delta)
    assert 2.9 < spent <= 3.0 * 1.01  # Opacus' own tolerance
    # More steps for the same budget need more noise.
    config.federation.rounds = 30
    assert privacy.site_plan(config, examples=100).noise_multiplier > plan.noise_multiplier


def test_delta_defaults_below_one_over_n_and_an_explicit_one_is_checked():
    assert privacy.default_delta(500) == 1e-5
    assert privacy.default_delta(50_000) == pytest.approx(2e-6) and 2e-6 < 1 / 50_000
    with pytest.raises(MedfedError, match=r"privacy.delta=0.05 is not below 1/n = 0.02"):
        privacy.site_plan(_config(dp="sample", epsilon=8.0, delta=0.05), examples=50)


def test_a_noise_multiplier_too_small_for_the_budget_is_refused_with_what_would_do():
    with pytest.raises(MedfedError, match=r"--noise-multiplier 0.3 is too small for epsilon=1 .*"
                                          r"use at least \d"):
        privacy.site_plan(_config(dp="sample", epsilon=1.0, noise_multiplier=0.3), examples=100)
    # Enough noise passes; without a budget any positive noise does.
    privacy.site_plan(_config(dp="sample", epsilon=50.0, noise_multiplier=2.0), examples=100)
    privacy.site_plan(_config(dp="sample", noise_multiplier=0.3), examples=100)


@pytest.mark.parametrize(("settings", "message"), [
    ({"privacy.dp": "sample"}, "privacy.epsilon"),
    ({"privacy.dp": "sample", "privacy.epsilon": 0.0}, "privacy.epsilon"),
    ({"privacy.dp": "sample", "privacy.epsilon": -1.0}, "privacy.epsilon"),
    ({"privacy.dp": "sample", "privacy.noise_multiplier": 0.0}, "no noise is no privacy"),
    ({"privacy.dp": "sample", "privacy.epsilon": 8.0, "federation.strategy": "fedprox"},
     "not per-example"),
    ({"privacy.dp": "sample", "privacy.epsilon": 8.0, "model.freeze": "2"}, "model.bn"),
    ({"privacy.dp": "client"}, "privacy.noise_multiplier"),
    ({"privacy.dp": "client", "privacy.noise_multiplier": 1.0, "federation.strategy": "fedmedian"},
     "calibrated to a mean"),
    ({"privacy.dp": "client", "privacy.noise_multiplier": 1.0, "federation.fraction_train": 0.5},
     "no credit for sampling"),
    ({"privacy.delta": 1.0}, "privacy.delta"),
    ({"privacy.dp": "laplace"}, "none, sample, client"),
])
def test_bad_privacy_settings_are_refused_before_anything_runs(settings, message):
    config = Config()
    for key, value in settings.items():
        set_value(config, key, value)
    with pytest.raises(MedfedError, match=message):
        validate(config)


def test_dp_sgd_fine_tunes_with_batchnorm_frozen():
    config = _config(dp="sample", epsilon=8.0)
    config.model.freeze, config.model.bn = "1", "frozen"
    validate(config)
    model = build_model(config.model, num_classes=2, seed=0)
    assert not [n for n, m in model.named_modules() if "BatchNorm" in type(m).__name__
                and not type(m).__name__.startswith("Frozen")]
    assert not wire.statistic_keys(wire.exchanged_keys(model, bn="frozen"))


def test_client_level_dp_refuses_batchnorm_statistics_on_the_wire():
    config = _config(dp="client", noise_multiplier=1.0)
    config.model.freeze = "1"
    with pytest.raises(MedfedError, match="cannot protect BatchNorm statistics"):
        check_model(config.model, num_classes=2, image_size=32, seed=0, dp="client")
    for bn in ("local", "frozen"):
        config.model.bn = bn
        check_model(config.model, num_classes=2, image_size=32, seed=0, dp="client")


# --- the site's ledger over the whole run --------------------------------------------------------

def test_epsilon_grows_over_rounds_and_equals_opacus_accountant_over_the_whole_history(
        site_file, tmp_path):
    config = _config(dp="sample", epsilon=8.0)
    plan = privacy.site_plan(config, examples=60)
    reported = []
    for server_round in (1, 2):
        # A fresh Context each time: what carries the spend is the site's state directory.
        reply = _reply(config, site_file, tmp_path, server_round=server_round)
        reported.append(dict(reply.content[messages.PRIVACY].items()))
    assert [r["steps"] for r in reported] == [4, 8]
    assert 0 < reported[0]["epsilon"] < reported[1]["epsilon"] < 8.0
    accountant = RDPAccountant()
    for _ in range(8):
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert reported[1]["epsilon"] == pytest.approx(accountant.get_epsilon(plan.delta), rel=1e-9)
    assert reported[1]["noise-multiplier"] == pytest.approx(plan.noise_multiplier)
    assert reported[1]["delta"] == plan.delta and reported[1]["max-grad-norm"] == 1.0
    assert reported[1]["budget"] == 8.0
    ledger = json.loads((tmp_path / "privacy" / "privacy-study-1.json").read_text())
    assert sum(entry[2] for entry in ledger["history"]) == 8
    # Another study at the same site starts its own ledger.
    other = _reply(config, site_file, tmp_path, server_round=1, study="study-2")
    assert other.content[messages.PRIVACY]["steps"] == 4


def test_a_site_past_its_budget_refuses_to_train_and_says_so(site_file, tmp_path):
    config = _config(dp="sample", epsilon=8.0)
    for server_round in (1, 2, 3):  # the planned run spends the budget
        _reply(config, site_file, tmp_path, server_round=server_round)
    spent = json.loads((tmp_path / "privacy" / "privacy-study-1.json").read_text())
    # Raised in the ClientApp, which Flower turns into an error reply carrying this reason.
    with pytest.raises(privacy.BudgetSpent, match=r"site hospital-a: privacy budget spent "
                                                  r"\(epsilon 8.00 of 8 after 12 steps.*trains no more"):
        client_app(_message(config, server_round=4), _context(site_file, tmp_path))
    # Nothing was spent by the refusal.
    assert json.loads((tmp_path / "privacy" / "privacy-study-1.json").read_text()) == spent


def test_a_study_resumed_under_other_settings_is_accounted_over_its_whole_history(
        site_file, tmp_path):
    generous = _config(dp="sample", epsilon=8.0)
    first = _reply(generous, site_file, tmp_path, server_round=1)
    spent = first.content[messages.PRIVACY]["epsilon"]
    # Resumed with a smaller budget than already spent: refused at once, nothing added.
    with pytest.raises(privacy.BudgetSpent, match="privacy budget spent"):
        client_app(_message(_config(dp="sample", epsilon=spent / 2), server_round=2),
                   _context(site_file, tmp_path))
    # Resumed with more rounds (so less noise per step for the same budget): both kinds of step
    # are in the ledger, and epsilon is Opacus' over all of them.
    longer = _config(dp="sample", epsilon=8.0)
    longer.federation.rounds = 6
    second = _reply(longer, site_file, tmp_path, server_round=2)
    plans = [privacy.site_plan(c, examples=60) for c in (generous, longer)]
    history = [(p.noise_multiplier, p.sample_rate, 4) for p in plans]
    assert plans[0].noise_multiplier != plans[1].noise_multiplier
    assert second.content[messages.PRIVACY]["epsilon"] == pytest.approx(
        privacy.epsilon_of(history, delta=plans[0].delta), rel=1e-9)


# --- what leaves a site --------------------------------------------------------------------------

def _scalars_and_small_lists(record: MetricRecord, *, num_classes: int) -> None:
    for key, value in record.items():
        if isinstance(value, list):
            assert len(value) <= num_classes ** 2, key  # a confusion matrix or label histogram
            assert all(float(v).is_integer() and v >= 0 for v in value), key  # counts only
        else:
            assert isinstance(value, (int, float)), key


def _inspect(reply: Message, *, config: Config, stage: str, images: np.ndarray,
             private: bool, train: bool) -> None:
    """Everything a reply holds: the trainable tensors, a site name and small aggregates."""
    content = reply.content
    model = build_model(config.model, num_classes=2, seed=config.seed)
    expected = wire.exchanged_keys(model, bn=config.model.bn, stage=stage)
    state = model.state_dict()
    if train:
        assert set(content.array_records) == {messages.ARRAYS}
        arrays = content[messages.ARRAYS]
        assert list(arrays.keys()) == expected
        for key, array in arrays.items():
            assert tuple(array.shape) == tuple(state[key].shape), key
        # The tensors' own bytes plus numpy's header (128 bytes) per array: nothing else rides along.
        raw = sum(state[k].numel() * state[k].element_size() for k in expected)
        assert raw < wire.record_bytes(arrays) <= raw + 128 * len(expected)
    else:
        assert not content.array_records
    records = {messages.METRICS, *([messages.EVALUATION, *([messages.PRIVACY] if private else [])]
                                   if train else [])}
    assert set(content.metric_records) == records
    for record in content.metric_records.values():
        _scalars_and_small_lists(record, num_classes=2)
    assert set(content.config_records) == {messages.SITE}
    assert dict(content[messages.SITE].items()) == {"name": SITE}
    # No image, feature or per-example value, and no path, in any record.
    text = json.dumps({name: {k: v for k, v in record.items()}
                       for name, record in [*content.metric_records.items(),
                                            *content.config_records.items()]})
    assert "/" not in text and "npz" not in text
    for record in content.array_records.values():
        for array in record.values():
            values = array.numpy()
            assert values.size < images[0].size * len(images)  # never the site's images
            assert len(images) not in values.shape  # nothing per example


@pytest.mark.parametrize("dp", ["none", "sample"])
def test_every_message_a_site_sends_holds_only_trainable_tensors_and_small_aggregates(
        site_file, tmp_path, dp):
    config = _config(**({"dp": "sample", "epsilon": 8.0} if dp == "sample" else {}))
    images = load_splits(site_file)["train"].images
    for stage in (HEAD, FINETUNE):
        if stage == FINETUNE:
            config.model.freeze, config.model.bn = "1", "frozen"
            config.federation.head_rounds = 1
        train = _reply(config, site_file, tmp_path / stage, server_round=1, stage=stage)
        _inspect(train, config=config, stage=stage, images=images, private=dp == "sample",
                 train=True)
        evaluation = _reply(config, site_file, tmp_path / stage, server_round=1, stage=stage,
                            kind=MessageType.EVALUATE)
        _inspect(evaluation, config=config, stage=stage, images=images, private=False, train=False)
    # The features the site cached for the head stage stayed in its state directory.
    assert list((tmp_path / HEAD / "features").glob("*.npy"))


# --- client level --------------------------------------------------------------------------------

def _strategy(config: Config, keys: list[str]) -> MedfedStrategy:
    stages = Stages.of_config(config)
    return MedfedStrategy(
        make_flower_strategy(config, num_sites=3), statistic_keys=[],
        schedule=PlateauSchedule(lr=1e-3, federation=config.federation), stages=stages,
        stage_keys={HEAD: keys, FINETUNE: keys}, rounds=config.federation.rounds,
        selection="loss", round_config=messages.round_config(config, classes=CLASSES, study="s"),
        expected_sites=["a", "b", "c"], min_sites=3, wait_s=0, norm_factor=0,
        max_examples=10_000, dp=config.privacy.dp, clip_delta=1e-5)


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


def _aggregate(config: Config, updates: dict[str, np.ndarray], *, weights: dict[str, int]):
    strategy = _strategy(config, ["w"])
    start = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    sent = list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))
    assert len(sent) == 3
    replies = []
    for node, (site, update) in enumerate(updates.items(), start=1):
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(update.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": weights[site], "train-loss": 0.5}),
            messages.EVALUATION: evaluation_record(),
            "site": messages.site_record(site)})
        replies.append(Message(content=content, reply_to=sent[node - 1]))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy(), strategy.rounds[1]


def test_client_level_dp_with_zero_noise_equals_fedavg_and_clips_each_update():
    updates = {"a": np.array([0.1, 0, 0, 0]), "b": np.array([0, 0.2, 0, 0]),
               "c": np.array([0, 0, 0.3, 0])}
    equal = {"a": 10, "b": 10, "c": 10}
    plain, _ = _aggregate(_config(), updates, weights=equal)
    private, record = _aggregate(_config(dp="client", noise_multiplier=0.0, clip=10.0), updates,
                                 weights=equal)
    np.testing.assert_allclose(private, plain, rtol=1e-6)
    np.testing.assert_allclose(plain, [0.1 / 3, 0.2 / 3, 0.1, 0], rtol=1e-6)
    assert record.client_privacy["epsilon"] is None  # no noise: no guarantee, and said so
    # Each update clipped to norm 0.15, then one site one vote whatever its size.
    clipped, _ = _aggregate(_config(dp="client", noise_multiplier=0.0, clip=0.15), updates,
                            weights={"a": 1, "b": 100, "c": 1000})
    np.testing.assert_allclose(clipped, [0.1 / 3, 0.15 / 3, 0.05, 0], rtol=1e-5)


def test_client_level_dp_noises_the_aggregate_and_reports_epsilon_per_round():
    updates = {s: np.zeros(4) for s in "abc"}
    config = _config(dp="client", noise_multiplier=1.0, clip=1.0)
    noised, record = _aggregate(config, updates, weights={"a": 1, "b": 1, "c": 1})
    assert np.abs(noised).max() > 0  # std 1 x 1 / 3 on each coordinate
    expected = privacy.epsilon_of([(1.0, 1.0, 1)], delta=1e-5)
    assert record.client_privacy["epsilon"] == pytest.approx(expected)
    assert record.client_privacy["sites"] == 3 and record.client_privacy["noise_multiplier"] == 1.0
    assert math.isinf(privacy.client_epsilon([0.0], delta=1e-5))
