"""medfed's strategy: any Flower strategy, wrapped so that

* every training reply is checked before aggregation (server/validation.py); a rejected one is
  recorded with its reason and the round goes on with the rest;
* BatchNorm statistics never reach a server optimizer: the wrapped strategy sees parameters only
  (no NaN from FedAdam or FedYogi on running variances); statistics follow the robust strategy's
  rule (coordinate-wise median, trimmed mean) and are averaged by example count otherwise;
* in a deployment the registry of Flower node ids names the sites: a reply's site is the one its
  node was registered as, and nodes enrolled by anyone else are never sampled or counted;
* per-site metrics and bytes on the wire are kept round by round (Flower keeps only aggregates);
* the round's learning rate comes from the server's plateau schedule, and once early stopping
  fires no more sites are sampled;
* the best global arrays (lowest smoothed aggregated validation loss) are kept for the final
  model;
* training runs in stages (common/schedule.py): only the stage's keys travel (the classifier
  alone in the head stage), the server optimizer's state restarts and the learning rate starts
  at the stage's own rate when a new stage begins;
* one message per round and site: the sites evaluate the global model they receive before
  training on it and return both, so the model after round r is judged from round r + 1's
  training replies; only the last round's aggregate gets an evaluation message of its own;
* no round waits for a site that is not there: each round asks for at most the sites connected
  now (Flower's own sampling would wait forever for a missing one), refuses to run below
  `min_sites`, and records who was missing;
* its whole state can be saved and restored, and a resumed run numbers its rounds from where the
  checkpoint left off (`round_offset`), so a resumed run equals an uninterrupted one.

Flower's `Strategy.start` still owns the round loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan, DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedAvgM, FedMedian,
    FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from medfed.common import messages
from medfed.common.config import BYZANTINE_MINIMUM, Config
from medfed.common.config_checks import check_sites
from medfed.common.messages import (
    COMPUTE_SECONDS, EVALUATION, METRICS, PEAK_MB, PRIVACY, TRAIN_LOSS, TRAIN_SECONDS, WEIGHT_KEY,
    clean, declared_name,
)
from medfed.common.privacy import client_epsilon
from medfed.common.wire import record_bytes
from medfed.common.schedule import PlateauSchedule, Stages, selection_score
from medfed.server.validation import RoundReference, screen, screen_evaluation, update_norm

log = logging.getLogger("medfed")


def mean_scalar_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the scalar metrics, ignoring NaN (e.g. AUC on a one-class split).

    List metrics (confusion matrices, histograms) are per site and are not averaged."""
    weights = np.array([float(r["metrics"][weight_key]) for r in records])
    result = MetricRecord()
    for key, value in records[0]["metrics"].items():
        if key == weight_key or isinstance(value, list):
            continue
        values = np.array([float(r["metrics"][key]) for r in records])
        ok = ~np.isnan(values)
        defined = ok.any() and weights[ok].sum() > 0
        result[key] = float(np.average(values[ok], weights=weights[ok])) if defined else float("nan")
    return result


def make_flower_strategy(config: Config, *, num_sites: int) -> Strategy:
    f = config.federation
    sampling = dict(
        fraction_train=f.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=max(1, round(f.fraction_train * num_sites)),
        min_evaluate_nodes=num_sites,
        min_available_nodes=num_sites,
        train_metrics_aggr_fn=mean_scalar_metrics,
        evaluate_metrics_aggr_fn=mean_scalar_metrics,
    )
    strategy = _base_strategy(config, sampling=sampling, num_sites=num_sites)
    p = config.privacy
    if p.dp == "client":
        # Flower adds noise of std z * clip / n to the mean of the updates, which MedfedStrategy
        # has clipped to `clip` (`clip_updates`): Flower 1.42's server-side clipping wrapper
        # divides by each update's norm and so ends the run on a site that sends back the model
        # unchanged (ZeroDivisionError).
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=p.noise_multiplier, clipping_norm=p.clip,
            num_sampled_clients=num_sites)
    return strategy


def _base_strategy(config: Config, *, sampling: dict, num_sites: int) -> Strategy:
    f = config.federation
    if f.strategy == "fedprox":
        return FedProx(**sampling, proximal_mu=f.mu)
    if f.strategy == "fedadam":
        return FedAdam(**sampling, eta=f.server_lr, eta_l=config.train.lr)
    if f.strategy == "fedyogi":
        return FedYogi(**sampling, eta=f.server_lr, eta_l=config.train.lr)
    if f.strategy == "fedavgm":
        return FedAvgM(**sampling, server_momentum=f.server_momentum)
    if f.strategy == "fedmedian":
        return FedMedian(**sampling)
    if f.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**sampling, beta=f.trim_fraction)
    if f.strategy in BYZANTINE_MINIMUM:
        check_sites(config, sites=num_sites)
    if f.strategy == "krum":
        return Krum(**sampling, num_malicious_nodes=f.byzantine)
    if f.strategy == "multikrum":
        # Set again every round to the replies received minus the assumed malicious sites.
        return MultiKrum(**sampling, num_malicious_nodes=f.byzantine,
                         num_nodes_to_select=max(1, num_sites - f.byzantine))
    if f.strategy == "bulyan":
        return Bulyan(**sampling, num_malicious_nodes=f.byzantine)
    return FedAvg(**sampling)


DP_WRAPPERS = (DifferentialPrivacyFixedClippingBase,)
# Strategies whose BatchNorm statistics are the coordinate-wise median of the sites': FedMedian's
# own rule, and the rule for Krum, MultiKrum and Bulyan, which select or trim whole updates by
# distances computed on the parameters alone (the statistics never enter them), so an
# example-weighted mean would let one site move the statistics as far as it likes.
MEDIAN_STATISTICS = (FedMedian, MultiKrum, Bulyan)  # Krum is a MultiKrum
# What Flower's server optimizers (FedAvgM, FedAdam, FedYogi) carry from round to round, keyed
# by the arrays they saw: restarted when a new stage sends other keys.
SERVER_OPTIMIZER_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")


@dataclass
class RoundRecord:
    """What one round left behind, per site."""

    round: int
    lr: float
    train: dict[str, dict] = field(default_factory=dict)      # site -> {loss, n}
    evaluate: dict[str, dict] = field(default_factory=dict)   # site -> raw metric dict
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # Training replies left out of the aggregate, as "site: reason".
    rejected: list[str] = field(default_factory=list)
    # Expected sites with no accepted training reply this round (absent, dropped, failed or rejected).
    missing: list[str] = field(default_factory=list)
    val_loss: float | None = None
    val_auc: float | None = None
    global_test: dict | None = None
    # DP-SGD: each site's spend over the study so far (its privacy record).
    privacy: dict[str, dict] = field(default_factory=dict)
    # Client-level DP: this round's release (sites aggregated, effective noise multiplier) and
    # epsilon over the study so far.
    client_privacy: dict | None = None


def site_name(reply: Message, registry: dict[int, str] | None = None) -> str:
    """The site a reply comes from: with a registry (deployment) the one its node was registered
    as, which a node cannot choose; without one (simulation) the name it gives. A node with no
    known name (an unregistered one, or an error reply, which has no content) is named by id."""
    node = reply.metadata.src_node_id
    name = registry.get(node) if registry is not None else declared_name(reply)
    return f"node-{node}" if name is None else name


def aggregate_statistics(records: list[RecordDict], *, keys: set[str], strategy: Strategy
                         ) -> ArrayRecord:
    """BatchNorm statistics of the replies, by the rule of the robust strategy in use: a site
    that could move the parameters only by a median or trimmed mean must not move the
    statistics further by a plain average (Krum, MultiKrum, Bulyan: the median)."""
    if not isinstance(strategy, (*MEDIAN_STATISTICS, FedTrimmedAvg)):
        return aggregate_arrayrecords(
            [RecordDict({"arrays": ArrayRecord({k: r["arrays"][k] for k in keys}),
                         "metrics": r["metrics"]}) for r in records],
            WEIGHT_KEY,
        )
    result = ArrayRecord()
    for key in sorted(keys):
        stacked = np.stack([r["arrays"][key].numpy() for r in records])
        if isinstance(strategy, MEDIAN_STATISTICS):
            result[key] = Array(np.asarray(np.median(stacked, axis=0)))
        else:
            result[key] = Array(np.asarray(trim_mean(stacked, strategy.beta)))
    return result


def clip_update(content: RecordDict, *, sent: dict[str, np.ndarray], norm: float) -> None:
    """Scale a reply's update (its arrays minus those sent) to an L2 norm of at most `norm`,
    over all its arrays together, in place; an update of norm 0 stays as it is."""
    arrays = content["arrays"]
    total = update_norm(arrays, {k: sent[k] for k in arrays.keys()})
    update = {k: arrays[k].numpy().astype(np.float64) - sent[k] for k in arrays.keys()}
    scale = min(1.0, norm / total) if total > 0 else 1.0
    content["arrays"] = ArrayRecord({
        k: Array(np.asarray(sent[k] + scale * u, dtype=arrays[k].numpy().dtype))
        for k, u in update.items()})


class RegisteredNodes:
    """The grid as the wrapped strategy sees it: only registered nodes exist, so Flower's own
    sampling never picks, nor waits for, a node that someone else enrolled."""

    def __init__(self, grid: Grid, registry: dict[int, str]) -> None:
        self._grid = grid
        self._registry = registry

    def get_node_ids(self) -> list[int]:
        return [node for node in self._grid.get_node_ids() if node in self._registry]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class MedfedStrategy(Strategy):
    def __init__(
        self,
        inner: FedAvg,
        *,
        statistic_keys: list[str],
        schedule: PlateauSchedule,
        stages: Stages,
        stage_keys: dict[str, list[str]],
        rounds: int,
        selection: str,
        round_config: dict,
        expected_sites: list[str],
        min_sites: int,
        wait_s: float,
        norm_factor: float,
        max_examples: int,
        dp: str = "none",
        clip_delta: float = 1e-5,
        registry: dict[int, str] | None = None,
        on_event: Callable[[str, RoundRecord], None] = lambda event, record: None,
    ) -> None:
        self.inner = inner
        # The strategy that samples and aggregates: the one a DP wrapper wraps, else `inner`.
        self.base = inner.strategy if isinstance(inner, DP_WRAPPERS) else inner
        self.dp = dp
        self.clip_delta = clip_delta
        self.statistic_keys = set(statistic_keys)
        self.schedule = schedule
        self.stages = stages
        self.stage_keys = stage_keys
        self.total_rounds = rounds
        self.selection = selection
        self.stage = stages.of(1)
        self.round_config = round_config
        self.expected_sites = expected_sites
        self.min_sites = min_sites
        self.wait_s = wait_s
        self.norm_factor = norm_factor
        self.max_examples = max_examples
        self.registry = registry
        self.round_offset = 0
        self.on_event = on_event
        self.rounds: dict[int, RoundRecord] = {}
        self.best_arrays: ArrayRecord | None = None
        self._sent: dict[int, int] = {}  # node id -> bytes sent to it this round
        self._dtypes: dict[str, np.dtype] = {}
        self._global: dict[str, np.ndarray] = {}  # the arrays sent for this round's training
        self._full: ArrayRecord | None = None  # the whole global model this round started from
        self._evaluated: ArrayRecord | None = None

    def summary(self) -> None:
        self.inner.summary()

    def record(self, server_round: int) -> RoundRecord:
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundRecord(round=server_round, lr=self.schedule.lr)
        return self.rounds[server_round]

    def _config(self, config: ConfigRecord, stage: str) -> ConfigRecord:
        return messages.with_round_values(config, self.round_config, lr=self.schedule.lr,
                                          stage=stage)

    def _enter_stage(self, server_round: int) -> str:
        stage = self.stages.of(server_round)
        if stage != self.stage:
            self.stage = stage
            for name in SERVER_OPTIMIZER_STATE:
                if hasattr(self.base, name):
                    setattr(self.base, name, None)
            self.schedule.restart(self.stages.start_lr(stage))
        return stage

    def _stage_arrays(self, arrays: ArrayRecord, stage: str) -> ArrayRecord:
        return ArrayRecord({k: arrays[k] for k in self.stage_keys[stage]})

    def _note_sent(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        messages = list(messages)
        size = record_bytes(arrays)
        for message in messages:
            node = message.metadata.dst_node_id
            self._sent[node] = self._sent.get(node, 0) + size
        return messages

    def _sorted(self, replies: Iterable[Message]) -> list[Message]:
        # Replies arrive in whatever order the sites finish; a fixed order makes the floating-point
        # sums, and so the whole run, reproducible for a given seed.
        return sorted(replies, key=lambda r: (site_name(r, self.registry), r.metadata.src_node_id))

    def _grid(self, grid: Grid) -> Grid:
        return grid if self.registry is None else RegisteredNodes(grid, self.registry)

    def _declared_examples(self) -> dict[str, int]:
        """Training examples each site declared with its latest evaluation (the sum of its
        train-split label histogram), the bound on the `num-examples` it may claim."""
        declared = {}
        for number in sorted(self.rounds):
            for site, metrics in self.rounds[number].evaluate.items():
                histogram = metrics.get("train-histogram")
                if isinstance(histogram, list) and all(isinstance(v, int) for v in histogram):
                    declared[site] = sum(histogram)
        return declared

    def _available(self, grid: Grid) -> None:
        """Ask the wrapped strategy for no more sites than are connected now (never below
        `min_sites`; waiting at most `wait_s` for them). `grid` shows registered nodes only."""
        deadline = time.monotonic() + self.wait_s
        while (connected := len(list(grid.get_node_ids()))) < self.min_sites:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {connected} site(s) connected, fewer than min-sites={self.min_sites}; "
                    f"stopping the run (the last checkpoint can be resumed)"
                )
            time.sleep(1.0)
        wanted = min(connected, len(self.expected_sites))
        self.base.min_available_nodes = wanted
        self.base.min_evaluate_nodes = wanted
        self.base.min_train_nodes = min(self.base.min_train_nodes, wanted)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.schedule.stopped:
            return []
        grid = self._grid(grid)
        self._available(grid)
        stage = self._enter_stage(server_round)
        self._full = arrays
        if not self._dtypes:
            self._dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        sent = self._stage_arrays(arrays, stage)
        self._global = {k: a.numpy() for k, a in sent.items()}
        self._sent = {}
        self.record(server_round)
        parameters = ArrayRecord({k: a for k, a in sent.items() if k not in self.statistic_keys})
        messages = list(self.inner.configure_train(server_round, parameters,
                                                   self._config(config, stage), grid))
        for message in messages:
            # The wrapped strategy saw parameters only (FedOpt keeps them as its x_t); sites get all.
            message.content[self.base.arrayrecord_key] = sent
        return self._note_sent(messages, sent)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = self._sorted(replies)
        if server_round not in self.rounds:
            return None, None  # a round skipped after early stopping
        record = self.record(server_round)
        for reply in replies:
            if reply.has_error():
                record.failures.append(f"{site_name(reply, self.registry)}: {reply.error.reason}")
        accepted, rejections = screen(
            [(site_name(r, self.registry), r) for r in replies if not r.has_error()],
            RoundReference(arrays=self._global, sites=self.expected_sites,
                           max_examples=self.max_examples, norm_factor=self.norm_factor,
                           num_classes=len(self.round_config["classes"]),
                           declared=self._declared_examples(), registry=self.registry,
                           private=self.dp == "sample"),
        )
        # Shown by the progress callback (on_event below), in simulation and deployment alike.
        record.rejected = [str(rejection) for rejection in rejections]
        answered = {name for name, _ in accepted}
        record.missing = [s for s in self.expected_sites if s not in answered]
        received = self.record(server_round - 1)
        for name, reply in accepted:
            metrics = reply.content["metrics"]
            record.train[name] = {"loss": float(metrics[TRAIN_LOSS]), "n": int(metrics[WEIGHT_KEY]),
                                  **{key.replace("-", "_"): float(metrics[key])
                                     for key in (COMPUTE_SECONDS, TRAIN_SECONDS, PEAK_MB)
                                     if key in metrics}}
            record.bytes_up[name] = record_bytes(reply.content["arrays"])
            record.bytes_down[name] = self._sent.get(reply.metadata.src_node_id, 0)
            # The site's evaluation of the model it received: the global model after the last round.
            received.evaluate[name] = dict(reply.content[EVALUATION].items())
            del reply.content[EVALUATION]  # Flower's aggregation expects one MetricRecord
            if PRIVACY in reply.content:
                record.privacy[name] = dict(reply.content[PRIVACY].items())
                del reply.content[PRIVACY]
        self.on_event("train", record)
        if accepted and server_round > 1:
            self._judge(received, self._full)
            if self.stages.of(received.round) != self.stage:
                # The previous stage's last model was judged by that stage's patience; the new
                # stage starts with all of its own.
                self.schedule.restart(self.stages.start_lr(self.stage))
        valid = [reply for _, reply in accepted]
        if not valid:
            return None, None
        statistics = None
        sent_statistics = self.statistic_keys.intersection(self._global)
        if sent_statistics:
            statistics = aggregate_statistics([r.content for r in valid], keys=sent_statistics,
                                              strategy=self.base)
            for reply in valid:
                reply.content["arrays"] = ArrayRecord(
                    {k: a for k, a in reply.content["arrays"].items() if k not in sent_statistics}
                )
        if isinstance(self.base, MultiKrum) and not isinstance(self.base, Krum):
            self.base.num_nodes_to_select = max(1, len(valid) - self.base.num_malicious_nodes)
        if isinstance(self.base, Bulyan) and len(valid) < 4 * self.base.num_malicious_nodes + 3:
            log.warning("round %d: Bulyan needs %d accepted updates (4f + 3, f = %d), got %d; the "
                        "global model is left unchanged this round", server_round,
                        4 * self.base.num_malicious_nodes + 3, self.base.num_malicious_nodes,
                        len(valid))
        if self.dp == "client":
            self._account_client_dp(record, aggregated=len(valid))
            for reply in valid:
                clip_update(reply.content, sent=self._global, norm=self.inner.clipping_norm)
                # The noise is calibrated to an unweighted mean: one site, one vote.
                reply.content[METRICS][WEIGHT_KEY] = 1
        parameters, metrics = self.inner.aggregate_train(server_round, valid)
        if parameters is None:
            return None, metrics
        merged = {**self._full, **parameters, **(statistics or {})}
        # Keep the model's dtypes: server optimizers compute in float64.
        values = {k: np.asarray(merged[k].numpy(), dtype=self._dtypes[k]) for k in self._dtypes}
        if not all(np.isfinite(value).all() for value in values.values()):
            # Every accepted update is finite, but a sum inside the aggregation can still overflow:
            # FedTrimmedAvg and Bulyan add float32 updates near float32's limit before dividing.
            log.warning("round %d: the aggregate is not finite; the global model is left unchanged "
                        "this round", server_round)
            record.failures.append("aggregate: not finite (accepted updates near float32's "
                                   "limit); the global model is left unchanged this round")
            return None, metrics
        return ArrayRecord({k: Array(value) for k, value in values.items()}), metrics

    def _account_client_dp(self, record: RoundRecord, *, aggregated: int) -> None:
        """This round's release: Flower's noise has std z * C / n on the mean of the m updates
        aggregated, i.e. z * m / n times the clip on their sum, whose sensitivity is C."""
        z = self.inner.noise_multiplier * aggregated / self.inner.num_sampled_clients
        releases = [r.client_privacy["noise_multiplier"] for _, r in sorted(self.rounds.items())
                    if r.client_privacy and r.round < record.round] + [z]
        record.client_privacy = {
            "noise_multiplier": z, "clip": self.inner.clipping_norm, "sites": aggregated,
            "delta": self.clip_delta,
            "epsilon": clean(client_epsilon(releases, delta=self.clip_delta)),  # None: no noise
        }

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        # Every other round's model is evaluated by the next round's training replies.
        if self.schedule.stopped or server_round != self.total_rounds:
            return []
        grid = self._grid(grid)
        self._available(grid)
        self._evaluated = arrays
        return self._evaluation_messages(server_round, arrays, config, grid,
                                         stage=self.stages.of(server_round))

    def _evaluation_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                             grid: Grid, *, stage: str) -> list[Message]:
        sent = self._stage_arrays(arrays, stage)
        messages = self.inner.configure_evaluate(server_round, sent, self._config(config, stage),
                                                 grid)
        self._sent = {}
        return self._note_sent(messages, sent)

    def collect_evaluation(self, replies: Iterable[Message], record: RoundRecord) -> list[Message]:
        """Keep each readable evaluation reply's metrics in `record` and return those replies; an
        error reply, or one the report could not read, is a failure of that site this round."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                record.failures.append(f"{site_name(reply, self.registry)}: {reply.error.reason}")
        kept, rejections = screen_evaluation(
            [(site_name(r, self.registry), r) for r in replies if not r.has_error()],
            sites=self.expected_sites, num_classes=len(self.round_config["classes"]),
            max_examples=self.max_examples, registry=self.registry,
        )
        for rejection in rejections:
            log.warning("round %d: evaluation reply rejected: %s", record.round, rejection)
            record.failures.append(f"{rejection.site}: evaluation reply rejected: {rejection.reason}")
        for name, reply in kept:
            record.evaluate[name] = dict(reply.content["metrics"].items())
            record.bytes_down[name] = record.bytes_down.get(name, 0) + self._sent.get(
                reply.metadata.src_node_id, 0)
        return [reply for _, reply in kept]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = self._sorted(replies)
        if server_round not in self.rounds or server_round != self.total_rounds:
            return None  # nothing was asked (see configure_evaluate)
        record = self.record(server_round)
        self.collect_evaluation(replies, record)
        return self._judge(record, self._evaluated)

    def _judge(self, record: RoundRecord, arrays: ArrayRecord) -> MetricRecord | None:
        """Aggregate the sites' evaluations of the global model after `record.round` (`arrays`)
        and let the schedule judge it; keep it when it is the best so far."""
        evaluations = [RecordDict({METRICS: MetricRecord(m)}) for _, m in sorted(record.evaluate.items())]
        aggregated = mean_scalar_metrics(evaluations, WEIGHT_KEY) if evaluations else None
        record.val_loss = float(aggregated["val-loss"]) if aggregated else float("nan")
        record.val_auc = float(aggregated["val-auc"]) if aggregated else float("nan")
        score = selection_score(loss=record.val_loss, auc=record.val_auc,
                                criterion=self.selection)
        if self.schedule.step(record.round, score) or self.best_arrays is None:
            self.best_arrays = arrays
        self.on_event("evaluate", record)
        return aggregated

    def evaluate_final(self, grid: Grid, arrays: ArrayRecord, *, timeout: float) -> RoundRecord:
        """Every site evaluates the chosen global model on its own splits."""
        record = RoundRecord(round=self.schedule.best_round, lr=self.schedule.lr)
        grid = self._grid(grid)
        self._available(grid)
        messages = self._evaluation_messages(0, arrays, ConfigRecord(), grid,
                                             stage=self.stages.of(self.schedule.best_round))
        self.collect_evaluation(grid.send_and_receive(messages, timeout=timeout), record)
        return record

    def state_dict(self) -> dict:
        """Round records, best arrays, schedule and the wrapped server optimizer's moments."""
        return {
            "rounds": {r: dataclasses.asdict(record) for r, record in self.rounds.items()},
            "best_arrays": _numpy(self.best_arrays),
            "schedule": self.schedule.state_dict(),
            "dtypes": {k: str(v) for k, v in self._dtypes.items()},
            "stage": self.stage,
            # FedAdam/FedYogi (FedOpt) and FedAvgM keep x_t and their moments between rounds.
            "optimizer": {name: _plain(getattr(self.base, name)) for name in SERVER_OPTIMIZER_STATE
                          if hasattr(self.base, name)},
        }

    def load_state_dict(self, state: dict) -> None:
        self.rounds = {int(r): RoundRecord(**record) for r, record in state["rounds"].items()}
        self.best_arrays = _arrays(state["best_arrays"])
        self.schedule.load_state_dict(state["schedule"])
        self._dtypes = {k: np.dtype(v) for k, v in state["dtypes"].items()}
        self.stage = state["stage"]
        for name, value in state["optimizer"].items():
            setattr(self.base, name, _arrays(value) if name in FEDAVGM_RECORDS
                    and isinstance(self.base, FedAvgM) else value)
        self.round_offset = max(self.rounds, default=0)


# FedAvgM keeps these as ArrayRecords; the checkpoint holds plain arrays.
FEDAVGM_RECORDS = ("current_arrays",)


def _plain(value):
    return _numpy(value) if isinstance(value, ArrayRecord) else value


def _numpy(arrays: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    return None if arrays is None else {k: a.numpy() for k, a in arrays.items()}


def _arrays(values: dict[str, np.ndarray] | None) -> ArrayRecord | None:
    return None if values is None else ArrayRecord({k: Array(v) for k, v in values.items()})
