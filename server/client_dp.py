"""Client-level differential privacy: every accepted update is clipped on the server before
Flower's DifferentialPrivacyClientSideFixedClipping adds its noise, and each round's release is
accounted (sites aggregated, effective noise multiplier, epsilon over the study so far)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from medfed.common.messages import METRICS, WEIGHT_KEY, clean
from medfed.common.privacy import client_epsilon
from medfed.server.records import RoundRecord
from medfed.server.validation import update_norm
from medfed.server.wrapper import StrategyWrapper


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


class ClippedUpdates(StrategyWrapper):
    """Strategy wrapper around Flower's client-side fixed clipping (`strategy`): clips each reply's
    update to its clipping norm here, on the server, and weighs every site alike. `delta` is the
    study's, for the accounting."""

    def __init__(self, strategy: DifferentialPrivacyFixedClippingBase, *, delta: float) -> None:
        super().__init__(strategy)
        self.delta = delta
        self._sent: dict[str, np.ndarray] = {}  # the parameters sent for this round's training

    def account(self, record: RoundRecord, *, rounds: dict[int, RoundRecord],
                aggregated: int) -> None:
        """`record`'s release: Flower's noise has std z * C / n on the mean of the m updates
        aggregated, i.e. z * m / n times the clip on their sum, whose sensitivity is C."""
        z = self.strategy.noise_multiplier * aggregated / self.strategy.num_sampled_clients
        releases = [r.client_privacy["noise_multiplier"] for _, r in sorted(rounds.items())
                    if r.client_privacy and r.round < record.round] + [z]
        record.client_privacy = {
            "noise_multiplier": z, "clip": self.strategy.clipping_norm, "sites": aggregated,
            "delta": self.delta,
            "epsilon": clean(client_epsilon(releases, delta=self.delta)),  # None: no noise
        }

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {k: a.numpy() for k, a in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            clip_update(reply.content, sent=self._sent, norm=self.strategy.clipping_norm)
            # The noise is calibrated to an unweighted mean: one site, one vote.
            reply.content[METRICS][WEIGHT_KEY] = 1
        return self.strategy.aggregate_train(server_round, replies)
