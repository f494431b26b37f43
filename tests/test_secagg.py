"""Secure aggregation (`--secagg`): Flower's SecAgg+ between medfed's strategy and its sites.

The federation runs in this process: `LocalGrid` hands each message to a ClientApp (Flower's real
`secaggplus_mod` and medfed's translation around the train handler) under each node's own Context
and turns an exception into an error reply, as Flower's engines do, so the four SecAgg+ exchanges
(keys, shares, masked updates, unmasking) are the real ones. Each round's replies are compared with
those of the same sites without secure aggregation, aggregated by the same MedfedStrategy."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.client import audit
from medfed.client.secagg import secure_aggregation
from medfed.common import messages
from medfed.common.config import Config
from medfed.common.config_checks import check_deployment, check_sites, validate
from medfed.common.config_loading import set_value
from medfed.common.errors import MedfedError
from medfed.common.schedule import FINETUNE, HEAD, PlateauSchedule, Stages
from medfed.server.aggregation import make_flower_strategy
from medfed.server.secagg import SecureGrid
from medfed.server.strategy import MedfedStrategy
from tests.commands import TINY, medfed
from tests.conftest import evaluation_record

SITES = {1: "a", 2: "b", 3: "c"}
EXAMPLES = {"a": 30, "b": 60, "c": 90}  # training examples: each site's weight
# One quantization level of SecAgg+ (2 x range over 2**22 levels); each site's share of the mean
# is rounded to within one level of its weighted update.
LEVEL = 2 * messages.SECAGG_RANGE / 2**22


@pytest.fixture(autouse=True)
def task_identity():
    # Messages need a run identity, which Flower sets in a real ServerApp process.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class LocalGrid:
    """Each node's ClientApp, called in this process with the node's own Context."""

    def __init__(self, app: ClientApp) -> None:
        self.app = app
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                                       run_config={}) for node in SITES}
        self.replies: list[Message] = []  # every reply the server received

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            # What crosses the wire is a copy: a site cannot touch the server's objects.
            received = copy.deepcopy(message)
            try:
                reply = self.app(received, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)),
                                reply_to=received)
            replies.append(reply)
        self.replies += replies
        return replies


START = {"weight": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
         "bias": np.array([0.1, -0.2], dtype=np.float32)}


def _update(site: str) -> dict[str, np.ndarray]:
    """What a site's training adds to the global arrays: different at every site."""
    rng = np.random.default_rng(ord(site))
    return {k: rng.normal(0, 0.1, size=v.shape).astype(np.float32) for k, v in START.items()}


def _gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in START)


def _site_app(*, secure: bool, failing: str | None = None, bad_loss: str | None = None,
              far: str | None = None) -> ClientApp:
    """A ClientApp whose train handler replies as medfed's does, with a known update per site;
    the site `failing` raises instead, `bad_loss` reports a NaN train loss, `far` moves 100 more."""
    app = ClientApp()

    def train(message: Message, context: Context) -> Message:
        site = SITES[message.metadata.dst_node_id]
        if site == failing:
            raise RuntimeError(f"{site} crashed while training")
        received = message.content[messages.ARRAYS]
        loss = float("nan") if site == bad_loss else 0.5
        trained = {k: received[k].numpy() + u + np.float32(100 * (site == far))
                   for k, u in _update(site).items()}
        return Message(RecordDict({
            messages.ARRAYS: ArrayRecord({k: Array(v) for k, v in trained.items()}),
            messages.METRICS: MetricRecord({messages.WEIGHT_KEY: EXAMPLES[site],
                                            messages.TRAIN_LOSS: loss}),
            messages.EVALUATION: evaluation_record(),
            messages.SITE: messages.site_record(site)}), reply_to=message)

    app.train(mods=[secure_aggregation])(train)
    return app


def _strategy(*, secure: bool) -> MedfedStrategy:
    config = Config()
    config.privacy.secagg = secure
    keys = list(START)
    return MedfedStrategy(
        make_flower_strategy(config, num_sites=3), statistic_keys=[],
        schedule=PlateauSchedule(lr=1e-3, federation=config.federation),
        stages=Stages.of_config(config), stage_keys={HEAD: keys, FINETUNE: keys},
        rounds=config.federation.rounds, selection="loss",
        round_config=messages.round_config(config, classes=["x", "y"], study="s"),
        expected_sites=list(SITES.values()), min_sites=3, wait_s=0, norm_factor=0,
        max_examples=10_000, secagg=secure)


def _round(grid, *, secure: bool):
    """One training round of MedfedStrategy over `grid`: the new global arrays and its record."""
    strategy = _strategy(secure=secure)
    start = ArrayRecord({k: Array(v) for k, v in START.items()})
    sent = strategy.configure_train(1, start, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(sent, timeout=60))
    new = None if arrays is None else {k: a.numpy() for k, a in arrays.items()}
    return new, strategy.rounds[1]


def _fedavg(sites) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[s] for s in sites)
    return {k: v + sum(EXAMPLES[s] * _update(s)[k].astype(np.float64) for s in sites) / total
            for k, v in START.items()}


def test_the_secagg_aggregate_equals_plain_fedavg_of_the_same_replies():
    plain, _ = _round(LocalGrid(_site_app(secure=False)), secure=False)
    sites = LocalGrid(_site_app(secure=True))
    secure, record = _round(SecureGrid(sites, max_weight=max(EXAMPLES.values())), secure=True)
    assert _gap(plain, _fedavg("abc")) < 1e-6
    # Within quantization: each of three sites within one level of its weighted share.
    assert _gap(secure, plain) <= 3 * LEVEL + 1e-6, _gap(secure, plain)
    assert sorted(record.train) == ["a", "b", "c"] and not record.failures
    assert {s: v["n"] for s, v in record.train.items()} == EXAMPLES
    assert sorted(record.evaluate) == [] and not record.missing  # round 1: nothing to judge yet
    # What the server got from each site in the masked-update stage: no plain array, and a
    # vector that, dequantized alone, is nowhere near the site's update.
    masked = [r for r in sites.replies if messages.SITE in r.content.config_records]
    assert len(masked) == 3
    for reply in masked:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        vectors = [bytes_to_ndarray(b) for b in
                   reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        alone = dict(zip(START, dequantize(vectors[1:], messages.SECAGG_RANGE, 2**22)))
        site = messages.declared_name(reply)
        assert all(np.abs(alone[k] - u).mean() > 1.0 for k, u in _update(site).items()), site


def test_the_site_audit_log_names_and_counts_what_secagg_sends(tmp_path):
    sites = LocalGrid(_site_app(secure=True))
    _round(SecureGrid(sites, max_weight=max(EXAMPLES.values())), secure=True)
    sent = [audit.describe_reply(r.content) for r in sites.replies if not r.has_error()]
    stages = [set(s["binary"]) for s in sent[:12:3]]  # site a, each of the four exchanges
    record = RECORD_KEY_CONFIGS
    assert stages == [{f"{record}.{Key.PUBLIC_KEY_1}", f"{record}.{Key.PUBLIC_KEY_2}"},
                      {f"{record}.{Key.CIPHERTEXT_LIST}"}, {f"{record}.{Key.MASKED_PARAMETERS}"},
                      {f"{record}.{Key.SHARE_LIST}"}], stages
    assert not any(s["tensors"] for s in sent)
    masked = sites.replies[6].content.config_records[record][Key.MASKED_PARAMETERS]
    assert sent[6]["bytes"] == sum(len(b) for b in masked) > 0
    log = tmp_path / "audit.jsonl"
    audit.append(log, {"run": 1, "app_hash": "0" * 64, "type": "train", "round": 1,
                       "sent": sent[6]})
    (line,) = audit.render(log)
    assert line.endswith(f"train round 1: sent 0 tensors ({sent[6]['bytes']:,} bytes), metrics "
                         f"{', '.join(sent[6]['metrics'])}, binary {record}.{Key.MASKED_PARAMETERS}")


def test_a_deployment_learns_the_largest_site_from_one_evaluation_each():
    """Real sites know only their own size: before round 1 each declares it (round 0)."""
    app = _site_app(secure=True)
    app.evaluate()(lambda message, context: Message(RecordDict({
        messages.METRICS: evaluation_record(train_histogram=[1, EXAMPLES[_site(message)] - 1]),
        messages.SITE: messages.site_record(_site(message))}), reply_to=message))
    strategy = _strategy(secure=True)
    start = ArrayRecord({k: Array(v) for k, v in START.items()})
    lines = []
    assert strategy.largest_site(LocalGrid(app), start, timeout=60,
                                 progress=lines.append) == max(EXAMPLES.values())
    assert sorted(strategy.rounds[0].evaluate) == sorted(EXAMPLES) and len(lines) == 1
    # Sizes already declared (a resumed study): nobody is asked again.
    assert strategy.largest_site(None, start, timeout=60, progress=lines.append) == max(
        EXAMPLES.values()) and len(lines) == 1
    with pytest.raises(MedfedError, match=r"training-set size before round 1, and none was "
                                          r"declared \(.*No evaluate function"):
        _strategy(secure=True).largest_site(LocalGrid(_site_app(secure=True)), start,
                                            timeout=60, progress=lines.append)


def _site(message: Message) -> str:
    return SITES[message.metadata.dst_node_id]


@pytest.mark.parametrize("failure", ["raises", "out of range"])
def test_one_site_dropping_out_is_tolerated_and_the_rest_aggregate(failure):
    # Out of range: site c's update goes past SecAgg+'s range; it refuses to send it clipped.
    app = _site_app(secure=True, **({"failing": "c"} if failure == "raises" else {"far": "c"}))
    secure, record = _round(SecureGrid(LocalGrid(app), max_weight=90), secure=True)
    assert _gap(secure, _fedavg("ab")) <= 2 * LEVEL + 1e-6
    assert sorted(record.train) == ["a", "b"] and record.missing == ["c"]
    reason = "crashed while training" if failure == "raises" else "beyond SecAgg+'s range"
    assert len(record.failures) == 1 and reason in record.failures[0], record.failures


class KeysLost(LocalGrid):
    """Site c answers SecAgg+'s first stage (key setup) with an error."""

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        lost = [m for m in messages if m.metadata.dst_node_id == 3 and RECORD_KEY_CONFIGS in
                m.content.config_records and m.content[RECORD_KEY_CONFIGS][Key.STAGE] == "setup"]
        errors = [Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="c is gone"),
                          reply_to=m) for m in lost]
        return super().send_and_receive([m for m in messages if m not in lost]) + errors


def test_a_site_lost_while_keys_are_shared_halts_the_round_and_says_so():
    # Flower 1.42's limit: the survivors are asked for key shares the lost site never sent.
    arrays, record = _round(SecureGrid(KeysLost(_site_app(secure=True)), max_weight=90),
                            secure=True)
    assert arrays is None and record.missing == ["a", "b", "c"] and not record.train
    assert sum("secure aggregation halted" in f for f in record.failures) == 2, record.failures
    assert any("c is gone" in f for f in record.failures)


def test_a_rejected_reply_voids_the_round_its_update_is_inside_the_sum():
    grid = SecureGrid(LocalGrid(_site_app(bad_loss="b", secure=True)), max_weight=90)
    arrays, record = _round(grid, secure=True)
    assert arrays is None  # the global model stays as it was
    assert len(record.rejected) == 1 and record.rejected[0].startswith("b: train-loss")
    assert any("cannot be taken out" in failure for failure in record.failures)
    # Without secure aggregation the same reply is simply left out.
    plain, _ = _round(LocalGrid(_site_app(bad_loss="b", secure=False)), secure=False)
    assert _gap(plain, _fedavg("ac")) < 1e-6


# --- refused before any training -----------------------------------------------------------------

def _config(**settings) -> Config:
    config = Config()
    for key, value in {"privacy.secagg": True, **settings}.items():
        set_value(config, key, value)
    return config


@pytest.mark.parametrize("settings, message", [
    ({"federation.strategy": "fedmedian"}, "sees only the weighted sum"),
    ({"federation.strategy": "krum"}, "sees only the weighted sum"),
    ({"privacy.dp": "client", "privacy.noise_multiplier": 1.0}, "sees only their sum"),
])
def test_secagg_with_what_needs_each_update_is_refused(settings, message):
    with pytest.raises(MedfedError, match=message):
        validate(_config(**settings))


def test_secagg_needs_three_sites_each_round():
    validate(_config(**{"privacy.dp": "sample", "privacy.epsilon": 8.0}))  # DP-SGD + SecAgg+
    with pytest.raises(MedfedError, match=r"--secagg needs at least 3 sites .* the study has 2 "):
        check_sites(validate(_config()), sites=2)
    with pytest.raises(MedfedError, match=r"2 sampled per round"):
        check_sites(validate(_config(**{"federation.fraction_train": 0.5})), sites=4)
    check_sites(validate(_config()), sites=3)
    # A deployment: three sites must be sure to train (--min-sites), not only registered.
    check_deployment(validate(_config()), sites=5, min_sites=3)
    with pytest.raises(MedfedError, match=r"--secagg needs at least 3 sites .* only 2 are sure to \(--min-sites 2 of 5"):
        check_deployment(validate(_config()), sites=5, min_sites=2)


def test_simulate_secagg_with_two_sites_is_one_error_line_before_any_training(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["simulate", "--dataset", "breastmnist", "--sites", "2",
                                      "--secagg", "--rounds", "1", *TINY, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --secagg needs at least 3 sites"), lines
    assert not out.exists() and not out.with_name("run.incomplete").exists()


# --- medfed simulate --secagg, end to end ---------------------------------------------------------

@pytest.mark.slow
def test_simulate_with_secagg_equals_the_plain_run_within_quantization(tmp_path, medmnist_dir):
    """The same seeded round on Flower's Simulation Engine with and without --secagg: the sites
    train the same updates from the same global model, so the two aggregates differ by SecAgg+'s
    quantization alone."""
    arrays, reports = {}, {}
    for name, extra in (("plain", []), ("secure", ["--secagg"])):
        out = tmp_path / name
        result = medfed("simulate", "--dataset", "breastmnist", "--sites", "3", "--alpha", "1.0",
                        "--rounds", "1", "--seed", "0", *TINY, "--compare", "federated",
                        "--set", "simulation.cpus_per_site=1", "--out", str(out), *extra,
                        data_dir=medmnist_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        run = out / "seed-0" / "federated"
        arrays[name] = torch.load(run / "checkpoint.pt", weights_only=False)["arrays"]
        reports[name] = json.loads((run / "report.json").read_text())
    assert "under secure aggregation (SecAgg+)" in result.stdout
    gap = max(float(np.abs(arrays["secure"][k] - v).max()) for k, v in arrays["plain"].items())
    assert gap <= 3 * LEVEL + 1e-6, gap
    guarantee = reports["secure"]["privacy"]["guarantee"]
    assert "only the weighted sum of the sites' updates" in guarantee, guarantee
