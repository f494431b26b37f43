"""Which nodes a round asks: in a deployment the registry of Flower node ids names the sites, and
nodes enrolled by anyone else are never sampled or counted; no round waits for a site that is not
there (Flower's own sampling would wait forever for a missing one)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medfed.common.messages import declared_name
from medfed.server.wrapper import StrategyWrapper


def site_name(reply: Message, registry: dict[int, str] | None = None, *,
              asked: dict[str, int] | None = None) -> str:
    """The site a reply comes from: with a registry (deployment) the one its node was registered
    as, which a node cannot choose; without one (simulation) the name it gives. A node with no
    known name (an unregistered one, or an error reply, which has no content) is named by id.

    The SuperLink answers itself for a node that stopped (its heartbeat lapsed, or its reply
    was cut off mid-upload), with an error reply from the SuperLink's own node id: `asked`
    (message id -> the node it was sent to) names the node by the message the error answers."""
    node = reply.metadata.src_node_id
    if reply.has_error() and node == SUPERLINK_NODE_ID and asked:
        node = asked.get(reply.metadata.reply_to_message_id, node)
    name = registry.get(node) if registry is not None else declared_name(reply)
    return f"node-{node}" if name is None else name


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


class ConnectedNodes:
    """The grid with the nodes found connected a moment ago, as the wrapped strategy samples."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid = grid
        self._nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class AvailableSites(StrategyWrapper):
    """Strategy wrapper: the wrapped strategy sees registered nodes only (with a `registry`) and
    is asked for no more sites than are connected now, never below `min_sites` (waiting at most
    `wait_s` for them), nor more than the study's `sites`; `base` is the strategy that samples."""

    def __init__(self, strategy: Strategy, *, base: Strategy, registry: dict[int, str] | None,
                 sites: int, min_sites: int, wait_s: float) -> None:
        super().__init__(strategy)
        self.base = base
        self.registry = registry
        self.sites = sites
        self.min_sites = min_sites
        self.wait_s = wait_s

    def _available(self, grid: Grid) -> Grid:
        if self.registry is not None:
            grid = RegisteredNodes(grid, self.registry)
        deadline = time.monotonic() + self.wait_s
        while len(nodes := list(grid.get_node_ids())) < self.min_sites:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} site(s) connected, fewer than min-sites={self.min_sites}; "
                    f"stopping the run (the last checkpoint can be resumed)"
                )
            time.sleep(1.0)
        wanted = min(len(nodes), self.sites)
        self.base.min_available_nodes = wanted
        self.base.min_evaluate_nodes = wanted
        self.base.min_train_nodes = min(self.base.min_train_nodes, wanted)
        # Flower's sampling asks the grid again and waits, without end, for `min_available_nodes`:
        # a site whose node went offline in between would hang the round. It samples from these.
        return ConnectedNodes(grid, nodes)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, self._available(grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config,
                                                self._available(grid))
