"""Secure aggregation (`--secagg`): every round's training goes through Flower's SecAgg+ workflow,
so the server learns the weighted mean of the sites' updates and never one site's update.

Flower 1.42 has SecAgg+ on its legacy API only (`SecAggPlusWorkflow` drives a legacy
`flwr.server.strategy.Strategy` through `configure_fit`/`aggregate_fit` over four exchanges), while
medfed's round loop is Flower's Message-API `Strategy.start` around MedfedStrategy. Only the
training exchange changes: `SecureGrid` is the grid that loop is given. It hands a round's training
messages (medfed's, one per sampled site) to a one-round legacy strategy, `LegacyFit`, and runs
Flower's SecAggPlusWorkflow over the real grid (setup, key sharing, masked updates, unmasking).
Each site's reply comes back to MedfedStrategy with its own records (train metrics, evaluation
of the model it received, privacy spend) and, in place of its arrays, the new global model: the
hand-over Flower itself makes to a legacy `aggregate_fit`, where every result carries the
aggregate. Every other message (evaluation, roll call) passes through untouched.

A site sends its update (client/secagg.py) weighted by its training examples over the largest
site's (`max_weight`), quantized into 2**22 levels over +/- messages.SECAGG_RANGE and masked
modulo 2**32 (Flower's defaults). Every sampled site shares its keys with every other
(num_shares = n) and any n - 1 of them can unmask (reconstruction_threshold = n - 1): a site that
drops out after sharing its keys is left out of the sum and the round aggregates the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict,
)
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from medfed.common.config import SECAGG_MIN_SITES
from medfed.common.messages import ARRAY_KEYS, ARRAYS, CONFIG, SECAGG_RANGE, SITE


class LegacyFit(FedAvg):
    """Flower's legacy FedAvg for one round under SecAgg+: its fit instructions are medfed's
    training messages (the global arrays as legacy parameters, medfed's round config plus the
    arrays' names), and what it aggregates is SecAgg+'s weighted mean update, which every result
    carries; it returns the global arrays plus that update as the new global model (`arrays`)."""

    def __init__(self, messages: list[Message], *, grid: Grid) -> None:
        super().__init__()
        self.messages = messages
        self.sent = {key: a.numpy() for key, a in messages[0].content[ARRAYS].items()}
        self.proxies = {m.metadata.dst_node_id: GridClientProxy(m.metadata.dst_node_id, grid,
                                                                m.metadata.run_id)
                        for m in messages}
        self.arrays: ArrayRecord | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        names = list(self.sent)
        return [(self.proxies[m.metadata.dst_node_id],
                 FitIns(parameters, {**m.content[CONFIG], ARRAY_KEYS: names}))
                for m in self.messages]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        update, metrics = super().aggregate_fit(server_round, results, failures)
        if update is None:
            return None, metrics
        new = {key: np.asarray(sent + mean, dtype=sent.dtype) for (key, sent), mean
               in zip(self.sent.items(), parameters_to_ndarrays(update), strict=True)}
        self.arrays = ArrayRecord({key: Array(value) for key, value in new.items()})
        return ndarrays_to_parameters(list(new.values())), metrics


class _Exchanges:
    """The real grid as SecAggPlusWorkflow uses it, keeping each site's reply to the masked-update
    stage (the only one medfed's train handler answers: it carries the site record) and each
    site's first error reply, at whatever stage."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.trained: dict[int, Message] = {}
        self.errors: dict[int, Message] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors.setdefault(node, reply)
            elif SITE in reply.content.config_records:
                self.trained[node] = reply
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class SecureGrid:
    """The grid MedfedStrategy's round loop is given under --secagg: training messages go through
    SecAgg+ (see the module's docstring), everything else straight to `grid`. `max_weight`: the
    largest site's training examples, which every site's weight is divided by."""

    def __init__(self, grid: Grid, *, max_weight: int) -> None:
        self._grid = grid
        self.max_weight = max_weight

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages, timeout=timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def _secure_round(self, messages: list[Message], *, timeout: float | None) -> list[Message]:
        n = len(messages)
        if n < SECAGG_MIN_SITES:
            raise RuntimeError(f"secure aggregation needs {SECAGG_MIN_SITES} or more sites in a "
                               f"round; only {n} could be asked this round")
        strategy = LegacyFit(messages, grid=self._grid)
        clients = SimpleClientManager()
        for proxy in strategy.proxies.values():
            clients.register(proxy)
        context = LegacyContext(
            Context(run_id=messages[0].metadata.run_id, node_id=0, node_config={},
                    state=RecordDict(), run_config={}),
            strategy=strategy, client_manager=clients)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: int(messages[0].content[CONFIG]["server-round"])})
        context.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content[ARRAYS]
        exchanges = _Exchanges(self._grid)
        SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=n - 1,
                           max_weight=float(self.max_weight), clipping_range=SECAGG_RANGE,
                           timeout=timeout)(exchanges, context)
        return [reply for message in messages
                if (reply := _reply(message, exchanges, strategy.arrays, sites=n)) is not None]


def _reply(message: Message, exchanges: _Exchanges, arrays: ArrayRecord | None, *, sites: int
           ) -> Message | None:
    """What MedfedStrategy receives for one site's training message: the site's own records with
    the new global arrays when its masked update is in the sum; when the sum could not be
    unmasked, an error saying so for a site that sent its masked update; otherwise its own
    error, or nothing when it never answered."""
    node = message.metadata.dst_node_id
    trained = exchanges.trained.get(node)
    if trained is not None and arrays is not None:
        records = {name: record for name, record in trained.content.items()
                   if not name.startswith("fitres.") and name != RECORD_KEY_CONFIGS}
        return Message(RecordDict({**records, ARRAYS: arrays}), reply_to=message)
    if trained is not None or (arrays is None and node not in exchanges.errors):
        # Flower 1.42 also halts when a site is lost while the keys are shared: the unmasking
        # stage asks the others for key shares that site never sent (secaggplus_mod._unmask).
        return Message(Error(code=ErrorCode.UNKNOWN,
                             reason=f"secure aggregation halted: the masked sum of the {sites} "
                                    f"sites' updates could not be unmasked; the global model "
                                    f"stays as it was"),
                       reply_to=message)
    return exchanges.errors.get(node)
