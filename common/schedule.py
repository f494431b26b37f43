"""Server-side early stopping and learning-rate reduction on the aggregated validation loss.

The learning-rate decision is torch's own ReduceLROnPlateau driving a one-parameter optimizer, so
the plateau rule is the familiar one; the chosen rate is sent to every site in the round config.
"""

from __future__ import annotations

import math

import torch

from medfed.common.config import FederationConfig


class PlateauSchedule:
    def __init__(self, *, lr: float, federation: FederationConfig) -> None:
        self._optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._optimizer, mode="min", factor=federation.lr_factor,
            patience=federation.lr_patience, min_lr=federation.min_lr,
        )
        self.patience = federation.patience
        self.best_loss = math.inf
        self.best_round = 0
        self.rounds_without_improvement = 0
        self.stopped_at: int | None = None

    @property
    def lr(self) -> float:
        return self._optimizer.param_groups[0]["lr"]

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def step(self, server_round: int, val_loss: float) -> bool:
        """Record one round's aggregated validation loss; True when it is the best so far."""
        if math.isnan(val_loss):
            val_loss = math.inf
        # Improvement is the scheduler's own judgement (it moves `best` only past its relative
        # threshold), so early stopping and the learning-rate rule count the same rounds.
        previous_best = self._plateau.best
        self._plateau.step(val_loss)
        improved = self._plateau.best != previous_best
        if improved:
            self.best_loss, self.best_round = val_loss, server_round
            self.rounds_without_improvement = 0
        else:
            self.rounds_without_improvement += 1
            if self.patience and self.rounds_without_improvement >= self.patience:
                self.stopped_at = server_round
        return improved

    def state_dict(self) -> dict:
        """Everything a resumed run needs to make the same decisions as an uninterrupted one."""
        return {"optimizer": self._optimizer.state_dict(), "plateau": self._plateau.state_dict(),
                "best_loss": self.best_loss, "best_round": self.best_round,
                "rounds_without_improvement": self.rounds_without_improvement,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self._optimizer.load_state_dict(state["optimizer"])
        self._plateau.load_state_dict(state["plateau"])
        self.best_loss, self.best_round = state["best_loss"], state["best_round"]
        self.rounds_without_improvement = state["rounds_without_improvement"]
        self.stopped_at = state["stopped_at"]
