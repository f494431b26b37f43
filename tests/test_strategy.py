"""The medfed strategy wrapper against mock Flower replies (no engine, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from conftest import evaluation_record
from flwr.supercore.task_identity import TaskIdentity

from medfed.common import wire
from medfed.common.config import Config
from medfed.common.messages import EVALUATION, round_config
from medfed.common.model import build_model
from medfed.common.schedule import FINETUNE, STAGES, PlateauSchedule, Stages
from medfed.server.aggregation import make_flower_strategy
from medfed.server.strategy import MedfedStrategy


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


def make_strategy(name: str, *, bn="avg", sites=3, min_sites=1, wait_s=0.0, registry=None,
                  rounds=10, byzantine=0):
    """A strategy over `rounds` rounds that all fine-tune (no head stage), as before stages."""
    config, model = small_model(bn)
    config.federation.strategy, config.federation.byzantine = name, byzantine
    keys = wire.exchanged_keys(model, bn=bn)
    strategy = MedfedStrategy(
        make_flower_strategy(config, num_sites=sites),
        statistic_keys=wire.statistic_keys(keys),
        schedule=PlateauSchedule(lr=config.train.lr, federation=config.federation),
        stages=Stages(head_rounds=0, head_lr=config.train.head_lr, lr=config.train.lr),
        stage_keys={s: wire.exchanged_keys(model, bn=bn, stage=s) for s in STAGES},
        rounds=rounds,
        selection="loss",
        round_config=round_config(config, classes=["normal", "pneumonia"], study="test"),
        expected_sites=[f"site-{i}" for i in range(sites)], min_sites=min_sites, wait_s=wait_s,
        norm_factor=config.federation.norm_factor, max_examples=config.federation.max_examples,
        registry=registry,
    )
    return strategy, model, keys


def reply_to(message: Message, *, arrays: ArrayRecord, n: int, site: str, loss: float = 0.5,
             evaluation: MetricRecord | None = None) -> Message:
    """A site's training reply: its update and, as every training reply carries, its evaluation
    of the global model it received (`evaluation`; default: a valid one)."""
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
        EVALUATION: evaluation_record() if evaluation is None else evaluation,
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
        assert config["stage"] == FINETUNE
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
    # The evaluations the replies carried are of the model the sites received: round 0's (initial).
    assert strategy.rounds[0].evaluate == {s: dict(evaluation_record().items())
                                           for s in ("site-0", "site-1")}
    assert record.evaluate == {}
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
    return evaluation_record(n, val_loss=val_loss, train_histogram=list(train_histogram))


def evaluation_reply(message: Message, *, site: str, val_loss: float, n: int) -> Message:
    return Message(content=RecordDict({"metrics": full_evaluation(n=n, val_loss=val_loss),
                                       "site": ConfigRecord({"name": site})}), reply_to=message)


def training_round(strategy: MedfedStrategy, server_round: int, arrays: ArrayRecord, grid, *,
                   val_loss: float) -> ArrayRecord:
    """One round: every site evaluates the model it received (`arrays`) at `val_loss`, trains,
    and replies with both; returns the aggregate (the model after this round)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = [reply_to(m, arrays=perturbed(arrays, scale=0.1, seed=10 * server_round + i), n=10,
                        site=f"site-{i}", evaluation=full_evaluation(n=5, val_loss=val_loss))
               for i, m in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id))]
    aggregate, _ = strategy.aggregate_train(server_round, replies)
    return aggregate


def test_early_stopping_keeps_best_arrays_and_stops_sampling():
    """The model after round r is judged by round r + 1's training replies (no evaluation
    message before the last round); early stopping fires while a round is aggregated."""
    strategy, model, keys = make_strategy("fedavg", sites=2, rounds=10)
    strategy.schedule.patience = 2
    grid = MockGrid([1, 2])
    arrays = wire.to_record(model, keys)
    # Validation loss of the model after round 0 (initial, never judged), 1, 2, 3, 4.
    losses = [0.9, 0.5, 0.4, 0.45, 0.47]
    models = [arrays]
    for rnd, loss in enumerate(losses, start=1):
        arrays = training_round(strategy, rnd, arrays, grid, val_loss=loss)
        models.append(arrays)
        assert list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid)) == []
        assert strategy.aggregate_evaluate(rnd, []) is None
        # Round rnd's replies evaluated the model after round rnd - 1.
        assert sorted(strategy.rounds[rnd - 1].evaluate) == ["site-0", "site-1"]
        assert strategy.rounds[rnd].evaluate == {}
    assert strategy.rounds[0].val_loss is None  # the initial model is not a candidate
    assert [strategy.rounds[r].val_loss for r in range(1, 5)] == pytest.approx(losses[1:])
    assert strategy.schedule.best_round == 2
    assert strategy.schedule.stopped_at == 4  # decided while aggregating round 5
    assert strategy.best_arrays is models[2]
    assert list(strategy.configure_train(6, arrays, ConfigRecord(), grid)) == []
    assert strategy.aggregate_train(6, []) == (None, None)
    assert 6 not in strategy.rounds


def test_only_the_last_round_sends_an_evaluation_message():
    strategy, model, keys = make_strategy("fedavg", sites=2, rounds=2)
    grid = MockGrid([1, 2])
    initial = wire.to_record(model, keys)
    after_1 = training_round(strategy, 1, initial, grid, val_loss=0.6)
    assert list(strategy.configure_evaluate(1, after_1, ConfigRecord(), grid)) == []
    after_2 = training_round(strategy, 2, after_1, grid, val_loss=0.5)
    assert strategy.rounds[1].val_loss == pytest.approx(0.5)
    assert strategy.best_arrays is after_1

    # The last round's aggregate has no next round to judge it: it is sent for evaluation alone.
    messages = sorted(strategy.configure_evaluate(2, after_2, ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
    assert [m.metadata.dst_node_id for m in messages] == [1, 2]
    for message in messages:
        assert list(message.content["arrays"].keys()) == keys
        assert message.content["config"]["stage"] == FINETUNE
    aggregated = strategy.aggregate_evaluate(2, [
        evaluation_reply(m, site=f"site-{i}", val_loss=0.3, n=5) for i, m in enumerate(messages)])
    assert aggregated["val-loss"] == pytest.approx(0.3)
    assert sorted(strategy.rounds[2].evaluate) == ["site-0", "site-1"]
    assert strategy.rounds[2].val_loss == pytest.approx(0.3)
    assert strategy.schedule.best_round == 2 and strategy.best_arrays is after_2


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
    # Round 0 holds the sites' evaluations of the initial model, sent with round 1's replies.
    assert restored.round_offset == 1 and sorted(restored.rounds) == [0, 1]
    assert restored.rounds[0].evaluate == strategy.rounds[0].evaluate
    assert sorted(restored.rounds[0].evaluate) == ["site-0", "site-1"]
    for name in ("m_t", "v_t", "current_arrays"):
        original = getattr(strategy.inner, name)
        assert set(getattr(restored.inner, name)) == set(original)
        for key, value in original.items():
            np.testing.assert_array_equal(getattr(restored.inner, name)[key], value)
    # Flower's loop restarts at 1; the strategy files it as round 2.
    list(restored.configure_train(1, arrays, ConfigRecord(), MockGrid([1, 2])))
    assert sorted(restored.rounds) == [0, 1, 2]


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


def test_a_site_whose_node_stopped_is_named_not_the_superlink():
    """The SuperLink answers itself for a node whose heartbeat lapsed (a site killed mid-round),
    from its own node id: the failure names the registered site the message went to."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    strategy, model, keys = make_strategy("fedavg", sites=2, registry={7: "site-0", 8: "site-1"})
    initial = wire.to_record(model, keys)
    messages = sorted(strategy.configure_train(1, initial, ConfigRecord(), MockGrid([7, 8])),
                      key=lambda m: m.metadata.dst_node_id)
    for message in messages:
        message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grid pushes it
    lapsed = create_message_error_unavailable_res_message(messages[1].metadata, "node_unavail")
    assert lapsed.metadata.src_node_id == SUPERLINK_NODE_ID
    arrays, _ = strategy.aggregate_train(1, [reply_to(messages[0], arrays=initial, n=10,
                                                      site="site-0"), lapsed])
    assert arrays is not None
    record = strategy.rounds[1]
    assert record.missing == ["site-1"]
    assert record.failures == [f"site-1: {lapsed.error.reason}"]


class LapsingGrid(MockGrid):
    """Its last node goes offline right after the nodes are first listed."""

    def get_node_ids(self):
        nodes, self.nodes = list(self.nodes), self.nodes[:-1]
        assert len(nodes) == 3, "listed again: Flower's sampling would wait for the lost node"
        return nodes


def test_a_node_lost_between_the_count_and_the_sampling_does_not_hang_the_round():
    strategy, model, keys = make_strategy("fedavg", sites=3, min_sites=2)
    messages = strategy.configure_train(1, wire.to_record(model, keys), ConfigRecord(),
                                        LapsingGrid([1, 2, 3]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_a_round_dropped_as_not_finite_leaves_the_server_optimizer_as_it_was(name):
    """Every site sends finite updates near float32's limit: the squared update in FedAdam's
    and FedYogi's second moment overflows. The round is dropped, its moments with it, and the
    next round moves the model again (an infinite moment would have frozen it for good)."""
    strategy, model, keys = make_strategy(name, sites=3)
    grid = MockGrid([1, 2, 3])
    after_1 = training_round(strategy, 1, wire.to_record(model, keys), grid, val_loss=0.5)
    moments = {k: {key: v.copy() for key, v in getattr(strategy.inner, k).items()}
               for k in ("m_t", "v_t")}

    messages = sorted(strategy.configure_train(2, after_1, ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
    huge = ArrayRecord({k: torch.full(tuple(a.shape), 3e38, dtype=torch.float32)
                        for k, a in after_1.items()})
    replies = [reply_to(m, arrays=huge, n=10, site=f"site-{i}",
                        evaluation=full_evaluation(n=5, val_loss=0.5))
               for i, m in enumerate(messages)]
    assert strategy.aggregate_train(2, replies)[0] is None
    assert any("not finite" in f for f in strategy.rounds[2].failures)
    for k, saved in moments.items():
        for key, value in saved.items():
            np.testing.assert_array_equal(getattr(strategy.inner, k)[key], value, err_msg=key)

    after_3 = training_round(strategy, 3, after_1, grid, val_loss=0.4)
    moved = [key for key in after_1.keys()
             if not np.array_equal(after_3[key].numpy(), after_1[key].numpy())]
    assert moved and all(np.isfinite(after_3[key].numpy()).all() for key in moved)
