"""What the server keeps round by round (per site: Flower keeps only aggregates), and the plain
form records and arrays take in the checkpoint (server/checkpoint.py), so that a resumed run
reads back exactly what it wrote."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord


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
    # Krum, MultiKrum, Bulyan: the sites whose updates they selected (None: every accepted one).
    selected: list[str] | None = None
    val_loss: float | None = None
    val_auc: float | None = None
    global_test: dict | None = None
    # DP-SGD: each site's spend over the study so far (its privacy record).
    privacy: dict[str, dict] = field(default_factory=dict)
    # Client-level DP: this round's release (sites aggregated, effective noise multiplier) and
    # epsilon over the study so far.
    client_privacy: dict | None = None


def rounds_state(rounds: dict[int, RoundRecord]) -> dict[int, dict]:
    return {number: dataclasses.asdict(record) for number, record in rounds.items()}


def load_rounds(state: dict) -> dict[int, RoundRecord]:
    return {int(number): RoundRecord(**record) for number, record in state.items()}


def plain_arrays(arrays: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    return None if arrays is None else {k: a.numpy() for k, a in arrays.items()}


def array_record(values: dict[str, np.ndarray] | None) -> ArrayRecord | None:
    return None if values is None else ArrayRecord({k: Array(v) for k, v in values.items()})
