"""The medfed strategy wrapper against mock Flower replies (no engine, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medfed.common import wire
from medfed.common.config import Config
from medfed.common.messages import evaluation_metrics, round_config
from medfed.common.metrics import SCALARS
from medfed.common.model import build_model
from medfed.common.schedule import PlateauSchedule
from medfed.server.strategy import MedfedStrategy, make_flower_strategy


@pytest.fixture(autouse=True)
def task_identity():
    # Messages need a run identity, which Flower sets in a real ServerApp process.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class MockGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def small_model(bn="avg"):
    config = Config()
    config.model.backbone, config.model.weights, config.model.freeze, config.model.bn = (
        "test_efficientnet", "none", "3", bn)
    return config, build_model(config.model, num_classes=2, seed=0)


def make_strategy(name: str, *, bn="avg", sites=3, min_sites=1, wait_s=0.0, registry=None):
    config, model = small_model(bn)
    config.federation.strategy = name
    keys = wire.exchanged_keys(model, bn=bn)
    strategy = MedfedStrategy(
        make_flower_strategy(config, num_sites=sites),
        statistic_keys=wire.statistic_keys(keys),
        schedule=PlateauSchedule(lr=config.train.lr, federation=config.federation),
        round_config=round_config(config, classes=["normal", "pneumonia"]),
        expected_sites=[f"site-{i}" for i in range(sites)], min_sites=min_sites, wait_s=wait_s,
        norm_factor=config.federation.norm_factor, max_examples=config.federation.max_examples,
        registry=registry,
    )
    return strategy, model, keys


def reply_to(message: Message, *, arrays: ArrayRecord, n: int, site: str, loss: float = 0.5) -> Message:
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
        "site": ConfigRecord({"name": site}),
    })
    return Message(content=content, reply_to=message)


def perturbed(record: ArrayRecord, *, scale: float, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    out = {}
    for key, array in record.items():
        value = array.numpy()
        if key.endswith("running_var"):
            value = np.abs(value + rng.normal(0, scale, value.shape)).astype(value.dtype) + 0.5
        else:
            value = (value + rng.normal(0, scale, value.shape)).astype(value.dtype)
        out[key] = torch.from_numpy(value)
    return ArrayRecord(out)


def test_train_messages_carry_exchanged_arrays_and_round_config():
    strategy, model, keys = make_strategy("fedadam")
    initial = wire.to_record(model, keys)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([11, 12, 13])))
    assert len(messages) == 3
    for message in messages:
        assert list(message.content["arrays"].keys()) == keys
        config = message.content["config"]
        assert config["lr"] == pytest.approx(1e-4)
        assert Config.from_json(config["medfed-config"]).model.backbone == "test_efficientnet"
    # The server optimizer holds parameters only: statistics never enter FedAdam's state.
    assert set(strategy.inner.current_arrays) == set(keys) - set(wire.statistic_keys(keys))
    assert wire.statistic_keys(keys), "the test model must exchange BatchNorm statistics"


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavg", "fedprox", "fedmedian", "fedtrimmedavg"])
def test_aggregation_keeps_statistics_out_of_server_optimizers(name):
    strategy, model, keys = make_strategy(name, sites=4)
    initial = wire.to_record(model, keys)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([1, 2, 3, 4])))
    sizes = [10, 30, 20, 40]
    sent = [perturbed(initial, scale=0.5, seed=i) for i in range(4)]
    replies = [reply_to(m, arrays=a, n=n, site=f"site-{i}")
               for i, (m, a, n) in enumerate(zip(messages, sent, sizes))]
    arrays, _ = strategy.aggregate_train(1, replies)

    assert list(arrays.keys()) == keys
    for key in keys:
        value = arrays[key].numpy()
        assert np.isfinite(value).all(), key
        assert value.dtype == initial[key].numpy().dtype
    for key in wire.statistic_keys(keys):
        stacked = np.stack([a[key].numpy() for a in sent])
        # Statistics follow the robust strategy's rule; 4 replies with trim 0.2 cut none.
        expected = {"fedmedian": np.median(stacked, axis=0),
                    "fedtrimmedavg": stacked.mean(axis=0)}.get(
            name, np.average(stacked, axis=0, weights=sizes))
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)
        if key.endswith("running_var"):
            assert (arrays[key].numpy() > 0).all()
    # Parameters did go through the wrapped strategy (they moved away from the initial values).
    parameter = next(k for k in keys if k not in wire.statistic_keys(keys))
    assert not np.allclose(arrays[parameter].numpy(), initial[parameter].numpy())


def test_per_site_metrics_and_bytes_are_kept():
    strategy, model, keys = make_strategy("fedavg", sites=2)
    initial = wire.to_record(model, keys)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([5, 6])))
    replies = [reply_to(m, arrays=initial, n=n, site=s, loss=l)
               for m, n, s, l in zip(messages, [10, 20], ["site-0", "site-1"], [0.25, 0.75])]
    strategy.aggregate_train(1, replies)
    record = strategy.rounds[1]
    assert record.train == {"site-0": {"loss": 0.25, "n": 10}, "site-1": {"loss": 0.75, "n": 20}}
    payload = wire.record_bytes(initial)
    assert record.bytes_up == {"site-0": payload, "site-1": payload}
    assert record.bytes_down == {"site-0": payload, "site-1": payload}
    # Bytes are what the arrays serialise to: at least 4 bytes per float32 value.
    assert payload >= 4 * sum(a.numpy().size for a in initial.values())


def test_local_batchnorm_never_travels():
    strategy, model, keys = make_strategy("fedavg", bn="local")
    bn_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_names
    assert not any(k.rsplit(".", 1)[0] in bn_names for k in keys)
    assert wire.statistic_keys(keys) == []


def full_evaluation(*, n: int, val_loss: float, train_histogram=(30, 20)) -> MetricRecord:
    """A complete two-class evaluation record, as a site sends it, with `n` validation examples
    (the server rejects an incomplete or inconsistent one)."""
    val = [n // 2, n - n // 2]
    results = {split: {**{name: 0.5 for name in SCALARS}, "loss": val_loss,
                       "confusion_matrix": [[val[0], 0], [0, val[1]]]} for split in ("val", "test")}
    return evaluation_metrics(results, histograms={"train": list(train_histogram), "val": val,
                                                   "test": val}, num_examples=n)


def evaluation_reply(message: Message, *, site: str, val_loss: float, n: int) -> Message:
    return Message(content=RecordDict({"metrics": full_evaluation(n=n, val_loss=val_loss),
                                       "site": ConfigRecord({"name": site})}), reply_to=message)


def test_early_stopping_keeps_best_arrays_and_stops_sampling():
    strategy, model, keys = make_strategy("fedavg", sites=2)
    strategy.schedule.patience = 2
    grid = MockGrid([1, 2])
    arrays = wire.to_record(model, keys)
    losses = [0.5, 0.4, 0.45, 0.47]
    evaluated = []
    for rnd, loss in enumerate(losses, start=1):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        arrays = perturbed(arrays, scale=0.1, seed=rnd)
        evaluated.append(arrays)
        messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        strategy.aggregate_evaluate(rnd, [evaluation_reply(m, site=f"site-{i}", val_loss=loss, n=5)
                                          for i, m in enumerate(messages)])
    assert strategy.schedule.best_round == 2
    assert strategy.schedule.stopped_at == 4
    assert strategy.best_arrays is evaluated[1]
    assert list(strategy.configure_train(5, arrays, ConfigRecord(), grid)) == []
    assert strategy.aggregate_train(5, []) == (None, None)
    assert 5 not in strategy.rounds


def test_aggregate_does_not_depend_on_reply_order():
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        strategy, model, keys = make_strategy("fedavg")
        initial = wire.to_record(model, keys)
        messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([1, 2, 3])))
        replies = [reply_to(messages[i], arrays=perturbed(initial, scale=0.3, seed=i), n=7 + 13 * i,
                            site=f"site-{i}") for i in range(3)]
        arrays, _ = strategy.aggregate_train(1, [replies[i] for i in order])
        results.append({k: a.numpy().tobytes() for k, a in arrays.items()})
    assert results[0] == results[1]


# --- sites that do not come, and resuming -----------------------------------------------------------

def test_a_round_never_waits_for_an_absent_site():
    """Three sites expected, two connected: the round goes on with two and names the third."""
    strategy, model, keys = make_strategy("fedavg", sites=3, min_sites=2)
    initial = wire.to_record(model, keys)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([7, 8])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [7, 8]
    replies = [reply_to(m, arrays=initial, n=10, site=f"site-{i}") for i, m in enumerate(messages)]
    strategy.aggregate_train(1, replies)
    assert strategy.rounds[1].missing == ["site-2"]


def test_below_min_sites_stops_instead_of_waiting_forever():
    strategy, model, keys = make_strategy("fedavg", sites=3, min_sites=3, wait_s=0.0)
    with pytest.raises(RuntimeError, match="only 2 site.*min-sites=3"):
        list(strategy.configure_train(1, wire.to_record(model, keys), ConfigRecord(), MockGrid([1, 2])))


def test_state_dict_restores_fedadam_moments_and_round_numbers():
    strategy, model, keys = make_strategy("fedadam", sites=2)
    initial = wire.to_record(model, keys)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([1, 2])))
    replies = [reply_to(m, arrays=perturbed(initial, scale=0.1, seed=i), n=10, site=f"site-{i}")
               for i, m in enumerate(messages)]
    arrays, _ = strategy.aggregate_train(1, replies)
    state = strategy.state_dict()

    restored, _, _ = make_strategy("fedadam", sites=2)
    restored.load_state_dict(state)
    assert restored.round_offset == 1 and list(restored.rounds) == [1]
    for name in ("m_t", "v_t", "current_arrays"):
        original = getattr(strategy.inner, name)
        assert set(getattr(restored.inner, name)) == set(original)
        for key, value in original.items():
            np.testing.assert_array_equal(getattr(restored.inner, name)[key], value)
    # Flower's loop restarts at 1; the strategy files it as round 2.
    list(restored.configure_train(1, arrays, ConfigRecord(), MockGrid([1, 2])))
    assert sorted(restored.rounds) == [1, 2]


def test_a_failed_site_is_reported_not_fatal():
    """An error reply (a site whose ClientApp raised) has no content; the round goes on."""
    strategy, model, keys = make_strategy("fedavg", sites=2)
    initial = wire.to_record(model, keys)
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([1, 2])))
    good = reply_to(messages[0], arrays=initial, n=10, site="site-0")
    failed = Message(Error(code=0, reason="ClientAppException: site-1 has no data"), reply_to=messages[1])
    arrays, _ = strategy.aggregate_train(1, [failed, good])
    assert arrays is not None
    record = strategy.rounds[1]
    assert record.missing == ["site-1"] and "has no data" in record.failures[0]
