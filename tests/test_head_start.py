"""The head's start from class means and its centered training (common/head_start.py), the
server's round-0 request for class sums, and the center in head-stage messages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from medfed.common import messages
from medfed.common.config import Config, TrainConfig
from medfed.common.config_checks import resolve
from medfed.common.errors import MedfedError
from medfed.common.head_start import HeadStart, centered, class_sums
from medfed.common.schedule import FINETUNE, HEAD, PlateauSchedule, Stages
from medfed.common.training import train_head
from medfed.server.aggregation import make_flower_strategy
from medfed.server.strategy import MedfedStrategy
from medfed.server.validation import class_sums_of
from tests.conftest import evaluation_record

CPU = torch.device("cpu")


def clustered(seed: int, n: int = 120, dim: int = 16, classes: int = 3):
    """Features around one mean per class, offset far from zero as ReLU features are."""
    rng = np.random.default_rng(seed)
    means = rng.normal(4, 1, (classes, dim))
    labels = rng.integers(0, classes, n)
    return (means[labels] + rng.normal(0, 1.5, (n, dim))).astype(np.float32), labels


def test_the_start_is_the_nearest_class_mean_rule():
    x, y = clustered(0)
    start = HeadStart.of_features(x, y, num_classes=3)
    layer = nn.Linear(16, 3)
    start.initialize(layer)
    logits = layer(torch.from_numpy(x)).detach().numpy()
    nearest = np.linalg.norm(x[:, None, :] - start.means[None], axis=2).argmin(axis=1)
    assert (logits.argmax(axis=1) == nearest).all()
    assert (nearest == y).mean() > 0.8  # the clusters are separable: the start already classifies


def test_sums_over_sites_give_the_pooled_start():
    x, y = clustered(1)
    parts = np.array_split(np.arange(len(y)), [20, 75])
    sums = sum(class_sums(x[i], y[i], num_classes=3)[0] for i in parts)
    counts = sum(class_sums(x[i], y[i], num_classes=3)[1] for i in parts)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=3))
    federated, pooled = HeadStart.of_sums(sums, counts), HeadStart.of_features(x, y, num_classes=3)
    np.testing.assert_allclose(federated.center, pooled.center, rtol=1e-6)
    np.testing.assert_allclose(federated.center, x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(federated.means, pooled.means, rtol=1e-6)


def test_a_class_no_site_holds_gets_a_zero_row():
    x, y = clustered(2, classes=2)
    start = HeadStart.of_sums(*class_sums(x, y, num_classes=3))
    np.testing.assert_array_equal(start.means[2], start.center)
    with pytest.raises(ValueError, match="no training examples"):
        HeadStart.of_sums(np.zeros((2, 4)), np.zeros(2))


def test_centered_coordinates_compute_the_same_logits_and_fold_back():
    x, _ = clustered(3)
    center = x.mean(axis=0)
    layer = nn.Linear(16, 3)
    before = copy.deepcopy(layer.state_dict())
    raw = layer(torch.from_numpy(x)).detach()
    with centered(layer, center):
        shifted = layer(torch.from_numpy(x - center)).detach()
    torch.testing.assert_close(shifted, raw, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.state_dict(), before, rtol=1e-6, atol=1e-5)


def test_training_with_a_center_is_training_on_centered_features():
    """The site's centered training equals plain training of the same head moved into centered
    coordinates, on features with the center taken off (what docs/BENCHMARKS.md measured)."""
    x, y = clustered(4)
    center = x.mean(axis=0)
    config = TrainConfig(local_steps=15, batch_size=16)
    raw = nn.Linear(16, 3)
    start = copy.deepcopy(raw.state_dict())
    moved = copy.deepcopy(raw)
    with torch.no_grad():
        moved.bias.add_(moved.weight @ torch.from_numpy(center))
    train_head(raw, x, y, config=config, lr=1e-2, proximal_mu=0.0, device=CPU, seed=7,
               center=center)
    train_head(moved, x - center, y, config=config, lr=1e-2, proximal_mu=0.0, device=CPU, seed=7)
    torch.testing.assert_close(raw.weight, moved.weight, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        folded = moved.bias - moved.weight @ torch.from_numpy(center)
    torch.testing.assert_close(raw.bias, folded, rtol=1e-4, atol=1e-4)
    # And it is not the raw-coordinate training it replaces.
    plain = nn.Linear(16, 3)
    plain.load_state_dict(start)
    train_head(plain, x, y, config=config, lr=1e-2, proximal_mu=0.0, device=CPU, seed=7)
    assert (plain.weight - raw.weight).abs().max() > 1e-3


def test_head_start_is_class_means_unless_the_sums_would_go_unprotected():
    assert resolve(Config()).federation.head_start == "class-means"
    config = Config()
    config.privacy.secagg = True
    assert resolve(config).federation.head_start == "none"
    config.federation.head_start = "class-means"
    with pytest.raises(MedfedError, match="federation.head_start.*secure aggregation"):
        resolve(config)
    config = Config()
    config.federation.head_start = "medians"
    with pytest.raises(MedfedError, match="federation.head_start.*class-means, none"):
        resolve(config)


# ---------------------------------------------------------------- the server's side
SITES = {1: "a", 2: "b", 3: "c"}
DIM = 5


@pytest.fixture(autouse=True)
def task_identity():
    # Messages need a run identity, which Flower sets in a real ServerApp process.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def site_features(site: str):
    rng = np.random.default_rng(ord(site))
    labels = rng.integers(0, 2, 10 + ord(site) % 7)
    return rng.normal(labels[:, None] * 2.0, 1.0, (len(labels), DIM)).astype(np.float32), labels


class LocalGrid:
    """Each node's ClientApp, called in this process."""

    def __init__(self, app: ClientApp) -> None:
        self.app, self.sent = app, []

    def get_node_ids(self):
        return list(SITES)

    def send_and_receive(self, sent, *, timeout=None):
        self.sent += sent
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        return [self.app(copy.deepcopy(m), context) for m in sent]


def statistics_app(*, broken: str | None = None, without_sums: bool = False) -> ClientApp:
    """Sites answering the server's request for class sums as medfed's ClientApp does; `broken`
    sends sums of the wrong shape; `without_sums`, every site sends its evaluation alone (as one
    that ignores the request would)."""
    app = ClientApp()

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        site = SITES[message.metadata.dst_node_id]
        x, y = site_features(site)
        assert messages.read_round_config(message).statistics
        sums, counts = class_sums(x, y, num_classes=2)
        record = ArrayRecord({"sums": Array(sums[:, :-1] if site == broken else sums),
                              "counts": Array(counts)})
        sums = {} if without_sums else {messages.CLASS_SUMS: record}
        return Message(RecordDict({
            messages.METRICS: evaluation_record(train_histogram=np.bincount(y, minlength=2).tolist()),
            **sums, messages.SITE: messages.site_record(site)}), reply_to=message)

    return app


def strategy() -> MedfedStrategy:
    config = Config()
    keys = ["classifier.weight", "classifier.bias"]
    return MedfedStrategy(
        make_flower_strategy(config, num_sites=3), statistic_keys=[],
        schedule=PlateauSchedule(lr=1e-3, federation=config.federation),
        stages=Stages(head_rounds=1, head_lr=3e-3, lr=1e-4),
        stage_keys={HEAD: keys, FINETUNE: keys}, rounds=2, selection="auc",
        round_config=messages.round_config(config, classes=["x", "y"], study="s"),
        expected_sites=list(SITES.values()), min_sites=1, wait_s=0, norm_factor=0,
        max_examples=10_000)


START = ArrayRecord({"classifier.weight": Array(np.zeros((2, DIM), np.float32)),
                     "classifier.bias": Array(np.zeros(2, np.float32))})


def test_the_server_starts_the_head_from_every_sites_class_sums():
    medfed = strategy()
    grid = LocalGrid(statistics_app())
    lines = []
    arrays = medfed.start_head(grid, START, timeout=60, progress=lines.append)
    pooled = [site_features(s) for s in SITES.values()]
    expected = HeadStart.of_features(np.concatenate([p[0] for p in pooled]),
                                     np.concatenate([p[1] for p in pooled]), num_classes=2)
    np.testing.assert_allclose(medfed.center, expected.center, rtol=1e-5)
    layer = nn.Linear(DIM, 2)
    expected.initialize(layer)
    np.testing.assert_allclose(arrays["classifier.weight"].numpy(), layer.weight.detach().numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(arrays["classifier.bias"].numpy(), layer.bias.detach().numpy(),
                               rtol=1e-5)
    assert "class means of" in lines[-1] and "3 sites" in lines[-1]
    assert medfed.head_start_bytes["up"] > 0 and medfed.head_start_bytes["down"] > 0

    # Every head-stage training message then carries the center, and its bytes are counted.
    sent = list(medfed.configure_train(1, arrays, ConfigRecord(), grid))
    assert len(sent) == 3
    for message in sent:
        np.testing.assert_array_equal(message.content[messages.HEAD_CENTER]["center"].numpy(),
                                      medfed.center)
    per_message = sum(len(a.data) for a in arrays.values()) + len(medfed.center_record()["center"].data)
    assert set(medfed._sent.values()) == {per_message}

    # A resumed study keeps the center.
    resumed = strategy()
    resumed.load_state_dict(medfed.state_dict())
    np.testing.assert_array_equal(resumed.center, medfed.center)


def test_a_site_with_bad_sums_is_named_and_left_out():
    medfed = strategy()
    lines = []
    medfed.start_head(LocalGrid(statistics_app(broken="b")), START, timeout=60,
                      progress=lines.append)
    (failure,) = medfed.rounds[0].failures
    assert failure.startswith("b: head start: sums must be 2 x 5 finite numbers")
    assert "at 2 sites; left out: b: head start: sums must be" in lines[-1]
    good = [site_features(s) for s in ("a", "c")]
    expected = np.concatenate([g[0] for g in good]).mean(axis=0)
    np.testing.assert_allclose(medfed.center, expected, rtol=1e-5)


def test_no_sums_at_all_stop_the_study_with_what_to_do():
    with pytest.raises(MedfedError, match=r"none came \(a: head start: expected an ArrayRecord.*"
                                          r"federation.head_start=none"):
        strategy().start_head(LocalGrid(statistics_app(without_sums=True)), START, timeout=60,
                              progress=lambda line: None)


@pytest.mark.parametrize("sums, counts, reason", [
    (np.full((2, DIM), np.nan), np.array([1, 2]), "finite"),
    (np.zeros((2, DIM)), np.array([1.5, 2.0]), "whole numbers"),
    (np.zeros((2, DIM)), np.array([-1, 2]), "whole numbers"),
    (np.zeros((3, DIM)), np.array([1, 2]), "2 x 5"),
])
def test_class_sums_are_checked(sums, counts, reason):
    reply = Message(RecordDict({messages.CLASS_SUMS: ArrayRecord(
        {"sums": Array(sums), "counts": Array(counts)})}), dst_node_id=1, message_type="evaluate")
    with pytest.raises(ValueError, match=reason):
        class_sums_of(reply, shape=(2, DIM))
    empty = Message(RecordDict({messages.METRICS: MetricRecord({})}), dst_node_id=1,
                    message_type="evaluate")
    with pytest.raises(ValueError, match="expected an ArrayRecord"):
        class_sums_of(empty, shape=(2, DIM))
