"""BatchNorm statistics never reach a server optimizer: the wrapped strategy sees parameters only
(no NaN from FedAdam or FedYogi on running variances); statistics follow the robust strategy's
rule (coordinate-wise median, trimmed mean) and are averaged by example count otherwise."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, MultiKrum, Strategy
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from medfed.common.messages import WEIGHT_KEY
from medfed.server.wrapper import StrategyWrapper

# Strategies whose BatchNorm statistics are the coordinate-wise median of the sites': FedMedian's
# own rule, and the rule for Krum, MultiKrum and Bulyan, which select or trim whole updates by
# distances computed on the parameters alone (the statistics never enter them), so an
# example-weighted mean would let one site move the statistics as far as it likes.
MEDIAN_STATISTICS = (FedMedian, MultiKrum, Bulyan)  # Krum is a MultiKrum


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


class StatisticsApart(StrategyWrapper):
    """Strategy wrapper: the wrapped strategy configures and aggregates the parameters alone, the
    sites still get (and send back) the `keys` (BatchNorm statistics) too, and those are
    aggregated here by the rule of `base`, the strategy that aggregates."""

    def __init__(self, strategy: Strategy, *, base: Strategy, keys: Iterable[str]) -> None:
        super().__init__(strategy)
        self.base = base
        self.keys = set(keys)
        self._sent: set[str] = set()  # the statistics sent for this round's training

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = self.keys.intersection(arrays.keys())
        parameters = ArrayRecord({k: a for k, a in arrays.items() if k not in self.keys})
        messages = list(self.strategy.configure_train(server_round, parameters, config, grid))
        for message in messages:
            # The wrapped strategy saw parameters only (FedOpt keeps them as its x_t); sites get all.
            message.content[self.base.arrayrecord_key] = arrays
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self._sent:
            return self.strategy.aggregate_train(server_round, replies)
        replies = list(replies)
        statistics = aggregate_statistics([r.content for r in replies], keys=self._sent,
                                          strategy=self.base)
        for reply in replies:
            reply.content["arrays"] = ArrayRecord(
                {k: a for k, a in reply.content["arrays"].items() if k not in self._sent})
        parameters, metrics = self.strategy.aggregate_train(server_round, replies)
        if parameters is None:
            return None, metrics
        return ArrayRecord({**parameters, **statistics}), metrics
