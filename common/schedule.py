"""What each round trains, and at what rate: the two training stages, and server-side early
stopping and learning-rate reduction on the aggregated validation loss.

The learning-rate decision is torch's own ReduceLROnPlateau driving a one-parameter optimizer, so
the plateau rule is the familiar one; the chosen rate is sent to every site in the round config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medfed.common.config import Config, FederationConfig

# The head stage trains the classifier alone on cached frozen features; the fine-tune stage
# trains every unfrozen layer on images.
HEAD, FINETUNE = "head", "finetune"
STAGES = (HEAD, FINETUNE)


def selection_rule(criterion: str) -> str:
    """How rounds are judged (the final model, early stopping, the learning rate), in the
    words the report uses."""
    what = ("highest validation AUC" if criterion == "auc" else "lowest validation loss")
    return (f"{what}, example-weighted over the sites and smoothed over rounds (exponential "
            f"moving average)")


def selection_score(*, loss: float | None, auc: float | None, criterion: str) -> float:
    """What the schedule minimizes: 1 - AUC, or the loss (also where no site's validation split
    holds both classes, so AUC is undefined). AUC ranks; a head that grows over-confident on
    skewed sites raises their loss while it ranks better (docs/BENCHMARKS.md, alpha = 0.1)."""
    if criterion == "auc" and auc is not None and math.isfinite(auc):
        return 1.0 - auc
    return math.nan if loss is None else loss


@dataclass(frozen=True)
class Stages:
    """Which stage each round belongs to, and the rate each stage starts at."""

    head_rounds: int   # rounds 1..head_rounds train the head (round 0, the initial model, too)
    head_lr: float
    lr: float

    @classmethod
    def of_config(cls, config: Config) -> Stages:
        f = config.federation
        if config.model.freeze == "all":
            head_rounds = f.rounds
        else:
            head_rounds = f.rounds // 2 if f.head_rounds is None else f.head_rounds
        return cls(head_rounds=head_rounds, head_lr=config.train.head_lr, lr=config.train.lr)

    def of(self, server_round: int) -> str:
        return HEAD if server_round <= self.head_rounds else FINETUNE

    def start_lr(self, stage: str) -> float:
        return self.head_lr if stage == HEAD else self.lr

    def plan(self, rounds: int) -> str:
        """The stages of a run in words, for the progress line and the report."""
        head = f"the classifier alone on cached frozen features, lr {self.head_lr:g}"
        finetune = f"fine-tuning the unfrozen stages, lr {self.lr:g}"
        if self.head_rounds >= rounds:
            return f"every round: {head}"
        if self.head_rounds == 0:
            return f"every round: {finetune}"
        return (f"{_rounds(1, self.head_rounds)}: {head}; "
                f"{_rounds(self.head_rounds + 1, rounds)}: {finetune}")


def _rounds(first: int, last: int) -> str:
    return f"round {first}" if first == last else f"rounds {first}-{last}"


class PlateauSchedule:
    def __init__(self, *, lr: float, federation: FederationConfig) -> None:
        self._optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._optimizer, mode="min", factor=federation.lr_factor,
            patience=federation.lr_patience, min_lr=federation.min_lr,
        )
        self.patience = federation.patience
        self.smoothing = federation.smoothing
        self.smoothed: float | None = None
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

    def restart(self, lr: float) -> None:
        """A new stage starts at its own rate and with fresh plateau patience; the best loss so
        far is kept, so a stage that does not improve on the last one stops early."""
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._plateau.num_bad_epochs = 0
        self._plateau.cooldown_counter = 0

    def step(self, server_round: int, val_loss: float) -> bool:
        """Record one round's aggregated validation loss; True when it is the best so far.

        Rounds are judged by the loss smoothed over rounds (an exponential moving average,
        `federation.smoothing` the weight of the past), so one lucky round on a few validation
        images does not become the final model."""
        if math.isnan(val_loss):
            val_loss = math.inf
        if math.isfinite(val_loss):
            previous = self.smoothed
            self.smoothed = val_loss if previous is None else (
                self.smoothing * previous + (1 - self.smoothing) * val_loss)
            val_loss = self.smoothed
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
                "stopped_at": self.stopped_at, "smoothed": self.smoothed}

    def load_state_dict(self, state: dict) -> None:
        self._optimizer.load_state_dict(state["optimizer"])
        self._plateau.load_state_dict(state["plateau"])
        self.best_loss, self.best_round = state["best_loss"], state["best_round"]
        self.rounds_without_improvement = state["rounds_without_improvement"]
        self.stopped_at = state["stopped_at"]
        self.smoothed = state["smoothed"]
