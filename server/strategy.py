"""medfed's strategy: any Flower strategy, wrapped so that

* every training reply is checked before aggregation (server/validation.py); a rejected one is
  recorded with its reason and the round goes on with the rest;
* per-site metrics and bytes on the wire are kept round by round (server/records.py);
* the round's learning rate comes from the server's plateau schedule, and once early stopping
  fires no more sites are sampled; the best global arrays are kept for the final model
  (server/selection.py);
* training runs in stages (common/schedule.py): only the stage's keys travel (the classifier
  alone in the head stage), the server optimizer's state restarts and the learning rate starts
  at the stage's own rate when a new stage begins;
* one message per round and site: the sites evaluate the global model they receive before
  training on it and return both, so the model after round r is judged from round r + 1's
  training replies; only the last round's aggregate gets an evaluation message of its own;
* under secure aggregation (server/secagg.py) every accepted reply carries the same unmasked
  aggregate, and a rejected reply voids the round: its update is inside the sum and cannot be
  taken out;
* its whole state can be saved and restored, and a resumed run numbers its rounds from where the
  checkpoint left off (`round_offset`), so a resumed run equals an uninterrupted one.

Between it and the Flower strategy, in Flower's own wrapper style (each one a Strategy around
the next, adding one concern and passing the rest through):

* AvailableSites (server/sampling.py): registered nodes only, and no round waits for a site that
  is not there (nor runs below `min_sites`);
* StatisticsApart (server/statistics.py): BatchNorm statistics aggregated apart from parameters;
* ClippedUpdates (server/client_dp.py), with client-level DP only: updates clipped before
  Flower's noise.

Flower's `Strategy.start` still owns the round loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medfed.common import messages, wire
from medfed.common.errors import MedfedError
from medfed.common.head_start import HeadStart
from medfed.common.messages import (
    CLASS_SUMS, COMPUTE_SECONDS, EVALUATION, HEAD_CENTER, PEAK_MB, PRIVACY, STATISTICS,
    TRAIN_LOSS, TRAIN_SECONDS, WEIGHT_KEY,
)
from medfed.common.schedule import HEAD, PlateauSchedule, Stages
from medfed.common.wire import record_bytes
from medfed.server.aggregation import (
    fit_to_replies, load_optimizer_state, optimizer_finite, optimizer_state, restart_optimizer,
    selected, unwrapped,
)
from medfed.server.client_dp import ClippedUpdates
from medfed.server.records import (
    RoundRecord, array_record, load_rounds, plain_arrays, rounds_state,
)
from medfed.server.sampling import AvailableSites, site_name
from medfed.server.selection import ModelSelection
from medfed.server.statistics import StatisticsApart
from medfed.server.validation import (
    RoundReference, class_sums_of, screen, screen_evaluation,
)

log = logging.getLogger("medfed")


class MedfedStrategy(Strategy):
    def __init__(
        self,
        inner: Strategy,
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
        secagg: bool = False,
        registry: dict[int, str] | None = None,
        on_event: Callable[[str, RoundRecord], None] = lambda event, record: None,
    ) -> None:
        # The Flower strategy as built (DP-wrapped or not), and `base`, the one that samples and
        # aggregates; medfed's wrappers go around `inner`, and this class calls `strategy`.
        self.inner = inner
        self.base = unwrapped(inner)
        self.clipping = ClippedUpdates(inner, delta=clip_delta) if dp == "client" else None
        self.strategy = AvailableSites(
            StatisticsApart(self.clipping or inner, base=self.base, keys=statistic_keys),
            base=self.base, registry=registry, sites=len(expected_sites), min_sites=min_sites,
            wait_s=wait_s)
        self.dp = dp
        self.secagg = secagg
        self.schedule = schedule
        self.selection = ModelSelection(schedule, criterion=selection)
        self.stages = stages
        self.stage_keys = stage_keys
        self.total_rounds = rounds
        self.stage = stages.of(1)
        self.round_config = round_config
        self.expected_sites = expected_sites
        self.norm_factor = norm_factor
        self.max_examples = max_examples
        self.registry = registry
        self.round_offset = 0
        self.on_event = on_event
        self.rounds: dict[int, RoundRecord] = {}
        self._sent: dict[int, int] = {}  # node id -> bytes sent to it this round
        self._asked: list[Message] = []  # this round's messages (Flower gives them their ids)
        self._dtypes: dict[str, np.dtype] = {}
        self._global: dict[str, np.ndarray] = {}  # the arrays sent for this round's training
        self._full: ArrayRecord | None = None  # the whole global model this round started from
        self._evaluated: ArrayRecord | None = None
        # The features' center over all sites, sent with every head-stage training message once
        # the head has started from class means (`start_head`); None: raw features.
        self.center: np.ndarray | None = None
        self.head_start_bytes = {"up": 0, "down": 0}

    @property
    def min_sites(self) -> int:
        return self.strategy.min_sites

    @min_sites.setter
    def min_sites(self, value: int) -> None:
        self.strategy.min_sites = value

    @property
    def best_arrays(self) -> ArrayRecord | None:
        """The global model the run ends with (see `selection`)."""
        return self.selection.best_arrays

    def summary(self) -> None:
        self.strategy.summary()

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
            restart_optimizer(self.base)
            self.schedule.restart(self.stages.start_lr(stage))
        return stage

    def _stage_arrays(self, arrays: ArrayRecord, stage: str) -> ArrayRecord:
        return ArrayRecord({k: arrays[k] for k in self.stage_keys[stage]})

    def _note_sent(self, messages: Iterable[Message], *records: ArrayRecord) -> list[Message]:
        messages = list(messages)
        self._asked.extend(messages)
        size = sum(record_bytes(record) for record in records)
        for message in messages:
            node = message.metadata.dst_node_id
            self._sent[node] = self._sent.get(node, 0) + size
        return messages

    def _sorted(self, replies: Iterable[Message]) -> list[Message]:
        # Replies arrive in whatever order the sites finish; a fixed order makes the floating-point
        # sums, and so the whole run, reproducible for a given seed.
        return sorted(replies, key=lambda r: (self._name(r), r.metadata.src_node_id))

    def _name(self, reply: Message) -> str:
        return site_name(reply, self.registry,
                         asked={m.metadata.message_id: m.metadata.dst_node_id for m in self._asked})

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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.schedule.stopped:
            return []
        stage = self._enter_stage(server_round)
        self._full = arrays
        if not self._dtypes:
            self._dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        sent = self._stage_arrays(arrays, stage)
        self._global = {k: a.numpy() for k, a in sent.items()}
        self._sent, self._asked = {}, []
        self.record(server_round)
        messages = list(self.strategy.configure_train(server_round, sent,
                                                      self._config(config, stage), grid))
        center = self.center_record()
        if center is None or stage != HEAD:
            return self._note_sent(messages, sent)
        for message in messages:
            message.content[HEAD_CENTER] = center
        return self._note_sent(messages, sent, center)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = self._sorted(replies)
        if server_round not in self.rounds:
            return None, None  # a round skipped after early stopping
        record = self.record(server_round)
        for reply in replies:
            if reply.has_error():
                record.failures.append(f"{self._name(reply)}: {reply.error.reason}")
        accepted, rejections = screen(
            [(self._name(r), r) for r in replies if not r.has_error()],
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
        if self.secagg and rejections:
            record.failures.append("secure aggregation: the sum holds the rejected sites' updates, "
                                   "which cannot be taken out of it; the global model is left "
                                   "unchanged this round")
            return None, None
        fit_to_replies(self.base, replies=len(valid), server_round=server_round)
        if self.clipping is not None:
            self.clipping.account(record, rounds=self.rounds, aggregated=len(valid))
        before = optimizer_state(self.base)
        aggregate, metrics = self.strategy.aggregate_train(server_round, valid)
        if aggregate is None:
            return None, metrics
        merged = {**self._full, **aggregate}
        # Keep the model's dtypes: server optimizers compute in float64.
        values = {k: np.asarray(merged[k].numpy(), dtype=self._dtypes[k]) for k in self._dtypes}
        if not (all(np.isfinite(value).all() for value in values.values())
                and optimizer_finite(optimizer_state(self.base))):
            # Every accepted update is finite, but a sum inside the aggregation can still overflow
            # (FedTrimmedAvg and Bulyan add float32 updates near float32's limit before dividing),
            # and so can FedAdam's and FedYogi's squared update, which would freeze the model for
            # good: the round is undone, the server optimizer's moments included.
            load_optimizer_state(self.base, before)
            log.warning("round %d: the aggregate is not finite; the global model is left unchanged "
                        "this round", server_round)
            record.failures.append("aggregate: not finite (accepted updates near float32's "
                                   "limit); the global model and the server optimizer are left "
                                   "unchanged this round")
            return None, metrics
        record.selected = selected(self.base, {name: reply.content for name, reply in accepted})
        return ArrayRecord({k: Array(value) for k, value in values.items()}), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        # Every other round's model is evaluated by the next round's training replies.
        if self.schedule.stopped or server_round != self.total_rounds:
            return []
        self._evaluated = arrays
        return self._evaluation_messages(server_round, arrays, config, grid,
                                         stage=self.stages.of(server_round))

    def _evaluation_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                             grid: Grid, *, stage: str) -> list[Message]:
        sent = self._stage_arrays(arrays, stage)
        messages = self.strategy.configure_evaluate(server_round, sent,
                                                    self._config(config, stage), grid)
        self._sent, self._asked = {}, []
        return self._note_sent(messages, sent)

    def collect_evaluation(self, replies: Iterable[Message], record: RoundRecord) -> list[Message]:
        """Keep each readable evaluation reply's metrics in `record` and return those replies; an
        error reply, or one the report could not read, is a failure of that site this round."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                record.failures.append(f"{self._name(reply)}: {reply.error.reason}")
        kept, rejections = screen_evaluation(
            [(self._name(r), r) for r in replies if not r.has_error()],
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
        aggregated = self.selection.judge(record, arrays)
        self.on_event("evaluate", record)
        return aggregated

    def largest_site(self, grid: Grid, arrays: ArrayRecord, *, timeout: float,
                     progress: Callable[[str], None]) -> int:
        """The most training examples any site declared. In a study that has run no round yet
        every site first evaluates `arrays` once (round 0), which declares its size."""
        if not self._declared_examples():
            progress("secure aggregation: asking every site for its training-set size")
            messages = self._evaluation_messages(0, arrays, ConfigRecord(), grid,
                                                 stage=self.stages.of(1))
            self.collect_evaluation(grid.send_and_receive(messages, timeout=timeout),
                                    self.record(0))
        declared = self._declared_examples()
        if not declared:
            failures = "; ".join(self.record(0).failures) or "no site answered"
            raise MedfedError(f"secure aggregation needs each site's training-set size before "
                              f"round 1, and none was declared ({failures}); see the sites' logs")
        return max(declared.values())

    def start_head(self, grid: Grid, arrays: ArrayRecord, *, timeout: float,
                   progress: Callable[[str], None]) -> ArrayRecord:
        """`arrays` with the classifier set to the nearest-class-mean rule of all sites' training
        features (common/head_start.py): every site evaluates `arrays` once (round 0) and
        answers with its per-class feature sums. Later head-stage messages carry the center."""
        head = wire.linear_classifier(self._stage_arrays(arrays, HEAD),
                                      num_classes=len(self.round_config["classes"]))
        if head is None:
            raise MedfedError(f"federation.head_start=class-means needs a linear classifier "
                              f"(a weight and a bias), but this backbone's head holds "
                              f"{self.stage_keys[HEAD]}; use --set federation.head_start=none")
        progress("head start: asking every site for its per-class sums of frozen features")
        messages = self._evaluation_messages(0, arrays, ConfigRecord({STATISTICS: True}), grid,
                                             stage=HEAD)
        record = self.record(0)
        replies = self.collect_evaluation(grid.send_and_receive(messages, timeout=timeout), record)
        sums, counts = [], []
        for reply in self._sorted(replies):
            try:
                site_sums, site_counts = class_sums_of(reply, shape=tuple(head.weight.shape))
            except ValueError as exc:
                record.failures.append(f"{self._name(reply)}: head start: {exc}")
                continue
            sums.append(site_sums)
            counts.append(site_counts)
            self.head_start_bytes["up"] += record_bytes(reply.content[CLASS_SUMS])
        self.head_start_bytes["down"] += sum(self._sent.values())
        if not sums:
            failures = "; ".join(record.failures) or "no site answered"
            raise MedfedError(f"the head's start needs the sites' class sums of features before "
                              f"round 1, and none came ({failures}); see the sites' logs, or "
                              f"start from timm's head with --set federation.head_start=none")
        start = HeadStart.of_sums(np.sum(sums, axis=0), np.sum(counts, axis=0))
        self.center = start.center
        start.initialize(head)
        progress(f"head start: class means of {int(np.sum(counts)):,} training examples at "
                 f"{len(sums)} sites" + (f"; left out: {'; '.join(record.failures)}"
                                         if record.failures else ""))
        return ArrayRecord({**arrays, **wire.linear_record(head, keys=self.stage_keys[HEAD])})

    def center_record(self) -> ArrayRecord | None:
        """What head-stage training messages carry beside the head once it started from class
        means: the features' center over all sites."""
        return None if self.center is None else ArrayRecord({"center": Array(self.center)})

    def evaluate_final(self, grid: Grid, arrays: ArrayRecord, *, timeout: float) -> RoundRecord:
        """Every site evaluates the chosen global model on its own splits."""
        record = RoundRecord(round=self.schedule.best_round, lr=self.schedule.lr)
        messages = self._evaluation_messages(0, arrays, ConfigRecord(), grid,
                                             stage=self.stages.of(self.schedule.best_round))
        self.collect_evaluation(grid.send_and_receive(messages, timeout=timeout), record)
        return record

    def state_dict(self) -> dict:
        """Round records, best arrays, schedule and the wrapped server optimizer's moments."""
        return {
            "rounds": rounds_state(self.rounds),
            "best_arrays": plain_arrays(self.best_arrays),
            "schedule": self.schedule.state_dict(),
            "dtypes": {k: str(v) for k, v in self._dtypes.items()},
            "stage": self.stage,
            "optimizer": optimizer_state(self.base),
            "center": self.center,
            "head_start_bytes": dict(self.head_start_bytes),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rounds = load_rounds(state["rounds"])
        self.selection.best_arrays = array_record(state["best_arrays"])
        self.schedule.load_state_dict(state["schedule"])
        self._dtypes = {k: np.dtype(v) for k, v in state["dtypes"].items()}
        self.stage = state["stage"]
        load_optimizer_state(self.base, state["optimizer"])
        self.round_offset = max(self.rounds, default=0)
        self.center = state["center"]
        self.head_start_bytes = dict(state["head_start_bytes"])
