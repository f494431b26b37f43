"""Checks of the sites' training replies before aggregation, and the node registry, against mock
Flower replies (no engine, no network)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict,
)
from conftest import evaluation_record
# task_identity is test_strategy's autouse fixture: imported, it applies here too.
from test_strategy import MockGrid, make_strategy, perturbed, task_identity

from medfed.common import wire
from medfed.common.messages import EVALUATION
from medfed.common.config import Config
from medfed.common.config_checks import validate
from medfed.common.errors import MedfedError
from medfed.server.app import _report_progress
from medfed.server.report import build_report, render_markdown
from medfed.server.records import RoundRecord
from medfed.server.validation import (
    RoundReference, content_problem, examples_problem, key_problem, norm_outliers,
)

REGISTRY = {1: "site-0", 2: "site-1", 3: "site-2"}


def numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


VALID = object()  # train_reply's default evaluation: a valid one


def train_reply(message: Message, *, arrays: dict[str, np.ndarray], site: str | None,
                n=10, loss=0.5, evaluation: MetricRecord | None = VALID) -> Message:
    """A site's training reply: its update, and its evaluation of the model it received (valid by
    default; None leaves the record out)."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
    })
    if evaluation is not None:
        content[EVALUATION] = evaluation_record() if evaluation is VALID else evaluation
    if site is not None:
        content["site"] = ConfigRecord({"name": site})
    return Message(content=content, reply_to=message)


def start_round(name="fedavg", *, sites=4, nodes=None, registry=None, server_round=1, rounds=10):
    strategy, model, keys = make_strategy(name, sites=sites, registry=registry, rounds=rounds)
    initial = wire.to_record(model, keys)
    grid = MockGrid(nodes or list(range(1, sites + 1)))
    messages = sorted(strategy.configure_train(server_round, initial, ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
    return strategy, initial, keys, messages


def good_updates(initial: ArrayRecord, count: int) -> list[dict[str, np.ndarray]]:
    return [numpy(perturbed(initial, scale=0.1, seed=i)) for i in range(count)]


def assert_fedavg(arrays: ArrayRecord, updates: list[dict[str, np.ndarray]], sizes: list[int]) -> None:
    """The aggregate is the example-weighted mean of exactly these updates, key by key."""
    assert set(arrays.keys()) == set(updates[0])
    for key in updates[0]:
        expected = np.average([u[key] for u in updates], axis=0, weights=sizes)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)


def parameter_key(keys: list[str]) -> str:
    return next(k for k in keys if k not in wire.statistic_keys(keys))


# --- one broken or hostile update among good ones ----------------------------------------------

def _nan(arrays, key):
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = np.nan


def _inf(arrays, key):
    arrays[key] = arrays[key].copy()
    arrays[key].flat[-1] = np.inf


TAMPERINGS = {
    "nan": (_nan, {}, "holds NaN"),
    "inf": (_inf, {}, "holds Inf"),
    "shape (1,)": (lambda a, k: a.__setitem__(k, np.zeros(1, np.float32)), {}, "has shape (1,)"),
    "missing key": (lambda a, k: a.pop(k), {}, "missing arrays"),
    "extra key": (lambda a, k: a.__setitem__("evil.weight", np.zeros(3, np.float32)), {},
                  "unexpected arrays 'evil.weight'"),
    "wrong dtype": (lambda a, k: a.__setitem__(k, a[k].astype(np.float64)), {}, "dtype float64"),
    "n 1e12": (None, {"n": 1e12}, "more than federation.max_examples=10000000"),
    "n -10": (None, {"n": -10}, "is -10, not positive"),
    "n 0": (None, {"n": 0}, "is 0, not positive"),
    "n 2.5": (None, {"n": 2.5}, "is 2.5, not a whole number"),
    "n nan": (None, {"n": float("nan")}, "not a finite number"),
    "loss inf": (None, {"loss": float("inf")}, "train-loss is inf"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_bad_update_is_rejected_and_the_round_goes_on_with_the_rest(case):
    tamper, reply_args, reason = TAMPERINGS[case]
    strategy, initial, keys, messages = start_round("fedavg", sites=4)
    updates = good_updates(initial, 4)
    if tamper:
        tamper(updates[3], parameter_key(keys))
    sizes = [10, 30, 20]
    replies = [train_reply(m, arrays=u, site=f"site-{i}", n=n)
               for i, (m, u, n) in enumerate(zip(messages, updates, sizes))]
    replies.append(train_reply(messages[3], arrays=updates[3], site="site-3",
                               **{"n": 40, **reply_args}))

    arrays, _ = strategy.aggregate_train(1, replies)

    record = strategy.rounds[1]
    assert len(record.rejected) == 1
    assert record.rejected[0].startswith("site-3: ") and reason in record.rejected[0]
    assert "\n" not in record.rejected[0]
    assert sorted(record.train) == ["site-0", "site-1", "site-2"]
    assert record.missing == ["site-3"]
    assert_fedavg(arrays, updates[:3], sizes)


def test_every_bad_update_of_a_round_rejected_yields_no_new_arrays():
    strategy, initial, keys, messages = start_round("fedavg", sites=2)
    bad = good_updates(initial, 2)
    for update in bad:
        _nan(update, parameter_key(keys))
    replies = [train_reply(m, arrays=u, site=f"site-{i}") for i, (m, u) in enumerate(zip(messages, bad))]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert len(strategy.rounds[1].rejected) == 2 and strategy.rounds[1].missing == ["site-0", "site-1"]


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "fedadam"])
def test_robust_and_server_optimizer_strategies_are_protected_too(name):
    """A NaN update would make any of these NaN; rejected first, the aggregate stays finite."""
    strategy, initial, keys, messages = start_round(name, sites=4)
    updates = good_updates(initial, 4)
    _nan(updates[0], parameter_key(keys))
    replies = [train_reply(m, arrays=u, site=f"site-{i}") for i, (m, u) in enumerate(zip(messages, updates))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [r.split(":")[0] for r in strategy.rounds[1].rejected] == ["site-0"]
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


# --- who sent it -------------------------------------------------------------------------------

def test_two_replies_under_one_site_name_are_both_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=3)
    updates = good_updates(initial, 3)
    replies = [train_reply(messages[0], arrays=updates[0], site="site-0"),
               train_reply(messages[1], arrays=updates[1], site="site-1"),
               train_reply(messages[2], arrays=updates[2], site="site-0")]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.rounds[1]
    assert record.rejected == ["site-0: 2 replies under this name this round; all rejected"] * 2
    assert list(record.train) == ["site-1"] and record.missing == ["site-0", "site-2"]
    assert_fedavg(arrays, [updates[1]], [10])


def test_a_site_outside_the_study_is_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=3)
    updates = good_updates(initial, 3)
    replies = [train_reply(m, arrays=u, site=s)
               for m, u, s in zip(messages, updates, ["site-0", "site-1", "outsider"])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.rounds[1].rejected == ["outsider: 'outsider' is not a site of this study"]
    assert_fedavg(arrays, updates[:2], [10, 10])


def test_the_registry_decides_which_nodes_are_sampled_and_counted():
    strategy, initial, _, messages = start_round("fedavg", sites=3, nodes=[1, 2, 99, 3],
                                                 registry=REGISTRY, rounds=2)
    assert [m.metadata.dst_node_id for m in messages] == [1, 2, 3]
    # Only the last round (2) sends evaluation messages of its own, to registered nodes only.
    assert list(strategy.configure_evaluate(1, initial, ConfigRecord(), MockGrid([1, 2, 99, 3]))) == []
    evaluation = strategy.configure_evaluate(2, initial, ConfigRecord(), MockGrid([1, 2, 99, 3]))
    assert sorted(m.metadata.dst_node_id for m in evaluation) == [1, 2, 3]

    strategy.min_sites = 3
    with pytest.raises(RuntimeError, match="only 2 site.*min-sites=3"):
        list(strategy.configure_train(2, initial, ConfigRecord(), MockGrid([1, 2, 99])))
    with pytest.raises(RuntimeError, match="only 2 site.*min-sites=3"):
        list(strategy.configure_evaluate(2, initial, ConfigRecord(), MockGrid([1, 2, 99])))


def test_without_a_registry_every_connected_node_is_sampled():
    _, _, _, messages = start_round("fedavg", sites=3, nodes=[1, 2, 99])
    assert [m.metadata.dst_node_id for m in messages] == [1, 2, 99]


def test_a_reply_from_an_unregistered_node_is_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=3, registry=REGISTRY)
    updates = good_updates(initial, 4)
    forged_request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=99,
                             message_type=MessageType.TRAIN)
    replies = [train_reply(m, arrays=u, site=f"site-{i}") for i, (m, u) in enumerate(zip(messages, updates))]
    replies.append(train_reply(forged_request, arrays=updates[3], site="site-2", n=1000))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.rounds[1].rejected == ["node-99: not a registered node"]
    assert sorted(strategy.rounds[1].train) == ["site-0", "site-1", "site-2"]
    assert_fedavg(arrays, updates[:3], [10, 10, 10])


def test_the_registered_name_wins_and_a_mismatched_one_is_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=3, registry=REGISTRY)
    updates = good_updates(initial, 2)
    replies = [
        train_reply(messages[0], arrays=updates[0], site="site-1"),  # node 1 is site-0
        train_reply(messages[1], arrays=updates[1], site="site-1"),
        Message(Error(code=0, reason="ClientAppException: disk full"), reply_to=messages[2]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.rounds[1]
    assert record.rejected == ["site-0: calls itself 'site-1', but node 1 is registered as 'site-0'"]
    assert list(record.train) == ["site-1"]
    # An error reply has no name of its own; the registry still names the hospital.
    assert record.failures == ["site-2: ClientAppException: disk full"]
    assert_fedavg(arrays, [updates[1]], [10])


def test_with_a_registry_a_reply_giving_no_name_is_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=3, registry=REGISTRY)
    updates = good_updates(initial, 2)
    replies = [train_reply(messages[0], arrays=updates[0], site=None),
               train_reply(messages[1], arrays=updates[1], site="site-1")]
    strategy.aggregate_train(1, replies)
    assert strategy.rounds[1].rejected == [
        "site-0: gives no site name, but node 1 is registered as 'site-0'"]


# --- how much it moved and how much it weighs -------------------------------------------------

def test_an_update_far_larger_than_the_others_is_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=4)
    updates = good_updates(initial, 3) + [numpy(perturbed(initial, scale=5.0, seed=9))]
    replies = [train_reply(m, arrays=u, site=f"site-{i}") for i, (m, u) in enumerate(zip(messages, updates))]
    arrays, _ = strategy.aggregate_train(1, replies)
    (rejection,) = strategy.rounds[1].rejected
    assert rejection.startswith("site-3: update norm ") and "10 x the round's median" in rejection
    assert_fedavg(arrays, updates[:3], [10, 10, 10])


def test_norm_factor_zero_turns_the_norm_check_off():
    strategy, initial, _, messages = start_round("fedavg", sites=4)
    strategy.norm_factor = 0.0
    updates = good_updates(initial, 3) + [numpy(perturbed(initial, scale=5.0, seed=9))]
    replies = [train_reply(m, arrays=u, site=f"site-{i}") for i, (m, u) in enumerate(zip(messages, updates))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.rounds[1].rejected == []
    assert_fedavg(arrays, updates, [10] * 4)


def test_norm_outliers_need_three_replies_and_a_scale():
    assert norm_outliers({"a": 1.0, "b": 1000.0}, factor=10) == {}
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 5.0}, factor=10) == {}
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 50.0}, factor=0) == {}
    assert list(norm_outliers({"a": 1.0, "b": 1.2, "c": 50.0}, factor=10)) == ["c"]
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 11.0}, factor=10) == {}


def test_num_examples_may_not_exceed_what_the_site_declared():
    """A site declares its training examples (train-histogram) in its evaluation, which now
    travels with its training reply: round 1's declarations bound round 2's num-examples."""
    strategy, initial, _, messages = start_round("fedavg", sites=2)
    updates = good_updates(initial, 2)
    declared = evaluation_record(5, train_histogram=[30, 20])
    strategy.aggregate_train(1, [train_reply(m, arrays=u, site=f"site-{i}", n=50, evaluation=declared)
                                 for i, (m, u) in enumerate(zip(messages, updates))])
    assert strategy.rounds[1].rejected == []

    grid = MockGrid([1, 2])
    messages = sorted(strategy.configure_train(2, initial, ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
    strategy.aggregate_train(2, [train_reply(messages[0], arrays=updates[0], site="site-0", n=50),
                                 train_reply(messages[1], arrays=updates[1], site="site-1", n=51)])
    assert strategy.rounds[2].rejected == [
        "site-1: num-examples is 51, more than the 50 training examples it declared"]
    assert list(strategy.rounds[2].train) == ["site-0"]


@pytest.mark.parametrize("value, declared, fragment", [
    (100, None, None), (100.0, 100, None), (101, 100, "more than the 100 training examples"),
    (10**7 + 1, None, "federation.max_examples=10000000"), (10**8, 10**9, "federation.max_examples"),
    ([1, 2], None, "not a finite number"), (float("-inf"), None, "not a finite number"),
])
def test_examples_problem(value, declared, fragment):
    problem = examples_problem(value, declared=declared, cap=10**7)
    assert (problem is None) if fragment is None else (fragment in problem)


# --- the shape of a reply ----------------------------------------------------------------------

def reference(arrays: dict[str, np.ndarray]) -> RoundReference:
    return RoundReference(arrays=arrays, sites=["site-0"], max_examples=100, norm_factor=10.0,
                          num_classes=2)


def training_content(arrays: ArrayRecord, metrics: MetricRecord, **more) -> RecordDict:
    """A training reply's records: `arrays`, `metrics`, a valid evaluation, and `more`."""
    return RecordDict({"arrays": arrays, "metrics": metrics,
                       EVALUATION: evaluation_record(5, train_histogram=[50, 50]), **more})


def test_a_valid_training_reply_passes():
    arrays = {"w": np.zeros(2, np.float32)}
    content = training_content(ArrayRecord({"w": Array(arrays["w"])}),
                               MetricRecord({"num-examples": 1, "train-loss": 0.1}))
    assert content_problem(content, reference(arrays), declared=None) is None


def test_a_reply_must_hold_exactly_one_arrays_and_the_metrics_and_evaluation_records():
    arrays = {"w": np.zeros(2, np.float32)}
    metrics = MetricRecord({"num-examples": 1, "train-loss": 0.1})
    content = training_content(ArrayRecord({"w": Array(arrays["w"])}), metrics,
                               more=ArrayRecord({"w": Array(arrays["w"])}))
    assert "got 'arrays', 'more' and 'evaluation', 'metrics'" in content_problem(
        content, reference(arrays), declared=None)
    content = training_content(ArrayRecord({"w": Array(arrays["w"])}), metrics,
                               extra=MetricRecord({"x": 1.0}))
    assert "got 'arrays' and 'evaluation', 'extra', 'metrics'" in content_problem(
        content, reference(arrays), declared=None)


def test_extra_or_missing_metrics_are_rejected():
    arrays = {"w": np.zeros(2, np.float32)}
    content = training_content(ArrayRecord({"w": Array(arrays["w"])}),
                               MetricRecord({"num-examples": 1, "accuracy": 0.9}))
    problem = content_problem(content, reference(arrays), declared=None)
    assert problem == "missing metrics 'train-loss'; unexpected metrics 'accuracy'"


def test_undecodable_array_bytes_are_rejected_not_raised():
    arrays = {"w": np.zeros(2, np.float32)}
    garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
    content = training_content(ArrayRecord({"w": garbage}),
                               MetricRecord({"num-examples": 1, "train-loss": 0.1}))
    assert content_problem(content, reference(arrays), declared=None).startswith(
        "array 'w' cannot be decoded (")


# --- the evaluation a training reply carries ---------------------------------------------------

def test_a_training_reply_without_its_evaluation_is_rejected():
    strategy, initial, _, messages = start_round("fedavg", sites=3)
    updates = good_updates(initial, 3)
    replies = [train_reply(messages[0], arrays=updates[0], site="site-0"),
               train_reply(messages[1], arrays=updates[1], site="site-1", evaluation=None),
               train_reply(messages[2], arrays=updates[2], site="site-2")]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.rounds[1]
    assert record.rejected == [
        "site-1: expected one ArrayRecord 'arrays' and MetricRecords 'evaluation', 'metrics', "
        "got 'arrays' and 'metrics'"]
    assert sorted(record.train) == ["site-0", "site-2"] and record.missing == ["site-1"]
    # The accepted sites' evaluations of the model they received (round 0's) are kept.
    assert sorted(strategy.rounds[0].evaluate) == ["site-0", "site-2"]
    assert_fedavg(arrays, [updates[0], updates[2]], [10, 10])


def _broken(key: str, value) -> MetricRecord:
    record = evaluation_record(5)
    record[key] = value
    return record


BROKEN_EVALUATIONS = {
    "val-auc 2.0": (_broken("val-auc", 2.0),
                    "val-auc is 2.0, not a rate from 0 to 1 (NaN where undefined)"),
    "test-loss -1": (_broken("test-loss", -1.0), "test-loss is -1.0, not a loss of 0 or more"),
    "num-examples not the val count": (_broken("num-examples", 4),
                                       "num-examples is 4, but val-histogram counts 5"),
    "confusion off the histogram": (_broken("val-confusion", [3, 0, 0, 3]),
                                    "val-confusion counts [3, 3] examples per true class"),
    "three classes": (evaluation_record(6, num_classes=3), "train-histogram must list 2 counts"),
    "missing key": (MetricRecord({k: v for k, v in evaluation_record(5).items() if k != "val-f1"}),
                    "missing metrics 'val-f1'"),
}


@pytest.mark.parametrize("case", list(BROKEN_EVALUATIONS))
def test_a_training_reply_with_a_broken_evaluation_is_rejected(case):
    evaluation, reason = BROKEN_EVALUATIONS[case]
    strategy, initial, _, messages = start_round("fedavg", sites=3)
    updates = good_updates(initial, 3)
    replies = [train_reply(m, arrays=u, site=f"site-{i}", evaluation=evaluation if i == 2 else VALID)
               for i, (m, u) in enumerate(zip(messages, updates))]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.rounds[1]
    (rejection,) = record.rejected
    assert rejection.startswith("site-2: its evaluation of the model it received: ")
    assert reason in rejection and "\n" not in rejection
    assert sorted(record.train) == ["site-0", "site-1"] and record.missing == ["site-2"]
    # Neither its update nor its evaluation counts.
    assert sorted(strategy.rounds[0].evaluate) == ["site-0", "site-1"]
    assert_fedavg(arrays, updates[:2], [10, 10])


def test_key_problem_names_a_few_keys_on_one_line():
    problem = key_problem("arrays", got={f"k{i}" for i in range(50)}, expected=[])
    assert problem == "unexpected arrays 'k0', 'k1', 'k10' and 47 more"
    assert key_problem("arrays", got={"a"}, expected=["a"]) is None


# --- BatchNorm statistics follow the robust rule -----------------------------------------------

def _statistics_round(name: str, *, sites: int):
    strategy, initial, keys, messages = start_round(name, sites=sites)
    strategy.norm_factor = 0.0  # the outlier statistics below are the point, not a norm check
    updates = good_updates(initial, sites)
    statistic = wire.statistic_keys(keys)[0]
    updates[0][statistic] = updates[0][statistic] + np.float32(100.0)
    sizes = [1000] + [10] * (sites - 1)  # the outlier also claims the most examples
    replies = [train_reply(m, arrays=u, site=f"site-{i}", n=n)
               for i, (m, u, n) in enumerate(zip(messages, updates, sizes))]
    arrays, _ = strategy.aggregate_train(1, replies)
    stacked = np.stack([u[statistic] for u in updates])
    return arrays[statistic].numpy(), stacked, sizes


def test_batchnorm_statistics_under_fedmedian_are_the_median():
    result, stacked, sizes = _statistics_round("fedmedian", sites=3)
    np.testing.assert_allclose(result, np.median(stacked, axis=0), rtol=1e-6)
    assert np.abs(result - np.average(stacked, axis=0, weights=sizes)).min() > 10


def test_batchnorm_statistics_under_fedtrimmedavg_are_the_trimmed_mean():
    result, stacked, _ = _statistics_round("fedtrimmedavg", sites=5)  # trim 0.2 of 5 cuts one each end
    expected = np.sort(stacked, axis=0)[1:-1].mean(axis=0)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_under_fedavg_stay_example_weighted():
    result, stacked, sizes = _statistics_round("fedavg", sites=3)
    np.testing.assert_allclose(result, np.average(stacked, axis=0, weights=sizes), rtol=1e-5)


# --- where rejections show ---------------------------------------------------------------------

def test_rejections_show_in_progress_and_report():
    config = Config()
    record = RoundRecord(round=1, lr=1e-4, train={"site-0": {"loss": 0.3, "n": 10}},
                         rejected=["site-1: array 'w' holds NaN", "site-2: num-examples is 0, not positive"],
                         missing=["site-1", "site-2"], selected=["site-0"])
    lines = []
    _report_progress("train", record, lines.append, config)
    assert "round   1 | update rejected: site-1: array 'w' holds NaN" in lines

    report = build_report(
        config=config.to_dict(), dataset={"name": "x", "classes": ["a", "b"]}, partition=None,
        rounds={1: record}, final_sites=RoundRecord(round=1, lr=1e-4), final_global=None,
        early_stopping={"stopped_at": None, "best_round": 1, "best_val_loss": math.nan},
        model={"backbone": "b", "weights": "none", "freeze": "3", "trainable_params": 1,
               "total_params": 1, "exchanged_tensors": 1, "payload_bytes": 4,
               "head_payload_bytes": 4, "head_center_bytes": 0,
               "head_start_bytes": {"up": 0, "down": 0}},
        wall_s=1.0,
    )
    assert report["rounds"][0]["rejected"] == record.rejected
    assert report["rounds"][0]["selected"] == ["site-0"]
    row = next(line for line in render_markdown(report).splitlines() if line.startswith("| 1 |"))
    # The sites missing, updates rejected, and (a Krum-family strategy) the updates it selected.
    assert row.endswith("| site-1, site-2 | 2 | site-0 |"), row
    report["rounds"][0]["selected"] = None  # a strategy that uses every accepted update
    assert "updates selected" not in render_markdown(report)


# --- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, allowed", [
    ("norm_factor", 0.5, "0 (off) or a number > 1"), ("norm_factor", -1.0, "0 (off)"),
    ("max_examples", 0, "1 or more"),
])
def test_config_refuses_bad_validation_settings(key, value, allowed):
    config = Config()
    setattr(config.federation, key, value)
    with pytest.raises(MedfedError, match=re.escape(f"'federation.{key}' has invalid value {value!r}; "
                                                   f"allowed: {allowed}")):
        validate(config)


def test_config_accepts_norm_check_off():
    config = Config()
    config.federation.norm_factor = 0.0
    assert validate(config).federation.norm_factor == 0.0
