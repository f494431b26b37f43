"""Server-side plateau learning-rate reduction and early stopping."""

from __future__ import annotations

import math

import pytest

from medfed.common.config import FederationConfig
from medfed.common.schedule import PlateauSchedule, selection_score


def _schedule(*, lr=1.0, patience=0, lr_patience=2, lr_factor=0.5, min_lr=1e-6, smoothing=0.0):
    # Unsmoothed unless asked: these tests pin the plateau rule itself on the losses given.
    return PlateauSchedule(lr=lr, federation=FederationConfig(
        patience=patience, lr_patience=lr_patience, lr_factor=lr_factor, min_lr=min_lr,
        smoothing=smoothing))


def test_smoothing_prefers_a_steady_round_to_one_lucky_dip():
    losses = [1.0, 0.5, 1.5, 0.6, 0.6, 0.6]
    raw, smoothed = _schedule(), _schedule(smoothing=0.5)
    for server_round, loss in enumerate(losses, start=1):
        raw.step(server_round, loss)
        smoothed.step(server_round, loss)
    assert raw.best_round == 2
    # 1.0, 0.75, 1.125, 0.8625, 0.73125, 0.665625: the last round is the best on average.
    assert smoothed.best_round == 6
    assert smoothed.best_loss == pytest.approx(0.665625)
    # A round with no defined loss (NaN: no site answered) leaves the average where it was.
    smoothed.step(7, math.nan)
    assert smoothed.smoothed == pytest.approx(0.665625) and smoothed.best_round == 6


def _run(schedule, losses):
    """Step through losses from round 1; return the lr seen after each step."""
    rates = []
    for server_round, loss in enumerate(losses, start=1):
        schedule.step(server_round, loss)
        rates.append(schedule.lr)
    return rates


@pytest.mark.parametrize("lr_patience", [0, 1, 2, 4])
def test_lr_reduced_after_lr_patience_plus_one_bad_rounds(lr_patience):
    schedule = _schedule(lr=0.1, lr_patience=lr_patience, lr_factor=0.5)
    bad = lr_patience + 1
    rates = _run(schedule, [1.0] + [1.0] * bad)
    # torch ReduceLROnPlateau: reduce once num_bad_epochs > patience, i.e. on bad round p+1.
    assert rates[:bad] == [0.1] * bad
    assert rates[bad] == pytest.approx(0.05)
    # The bad-round count restarts after a reduction: the next cut needs p+1 more bad rounds.
    more = _run(schedule, [1.0] * bad)
    assert more[:-1] == pytest.approx([0.05] * (bad - 1))
    assert more[-1] == pytest.approx(0.025)


def test_lr_sequence_and_min_lr():
    schedule = _schedule(lr=1.0, lr_patience=2, lr_factor=0.5, min_lr=0.2)
    rates = _run(schedule, [1.0] * 13)
    assert rates == pytest.approx(
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2])


def test_improvement_resets_lr_counter():
    schedule = _schedule(lr=1.0, lr_patience=2)
    rates = _run(schedule, [1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 1.0])
    assert rates == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])


def test_best_round_tracks_minimum():
    schedule = _schedule()
    improved = [schedule.step(r, loss) for r, loss in enumerate([0.9, 0.7, 0.8, 0.6, 0.6, 0.65], 1)]
    assert improved == [True, True, False, True, False, False]  # an equal loss is no improvement
    assert schedule.best_round == 4
    assert schedule.best_loss == pytest.approx(0.6)
    assert schedule.rounds_without_improvement == 2


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_after_patience_bad_rounds(patience):
    schedule = _schedule(patience=patience, lr_patience=100)
    schedule.step(1, 0.5)
    for offset in range(1, patience):
        schedule.step(1 + offset, 0.6)
        assert not schedule.stopped and schedule.stopped_at is None
    schedule.step(1 + patience, 0.7)
    assert schedule.stopped
    assert schedule.stopped_at == 1 + patience
    assert schedule.best_round == 1


def test_improvement_resets_early_stopping():
    schedule = _schedule(patience=2, lr_patience=100)
    for server_round, loss in enumerate([1.0, 1.1, 0.9, 1.0], start=1):
        schedule.step(server_round, loss)
    assert not schedule.stopped
    schedule.step(5, 1.0)
    assert schedule.stopped_at == 5
    assert schedule.best_round == 3


def test_nan_counts_as_no_improvement():
    schedule = _schedule(patience=2, lr_patience=0, lr=1.0)
    assert schedule.step(1, 0.5) is True
    assert schedule.step(2, math.nan) is False
    assert schedule.best_round == 1 and schedule.best_loss == 0.5
    assert schedule.lr == pytest.approx(0.5)  # counted as a bad round by the lr schedule too
    assert schedule.step(3, float("nan")) is False
    assert schedule.stopped_at == 3


def test_nan_first_round_never_best():
    schedule = _schedule(patience=3)
    assert schedule.step(1, math.nan) is False
    assert schedule.best_round == 0
    assert schedule.step(2, 2.0) is True
    assert schedule.best_round == 2


def test_patience_zero_never_stops():
    schedule = _schedule(patience=0, lr_patience=1, min_lr=0.0)
    schedule.step(1, 0.1)
    for server_round in range(2, 60):
        schedule.step(server_round, 1.0 + server_round)
    assert not schedule.stopped and schedule.stopped_at is None
    assert schedule.rounds_without_improvement == 58
    assert schedule.best_round == 1


def test_state_dict_resumes_the_same_decisions():
    """A schedule restored mid-run decides exactly as one that never stopped."""
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.1]
    federation = FederationConfig(patience=4, lr_patience=1, lr_factor=0.5)
    whole = PlateauSchedule(lr=1e-3, federation=federation)
    decisions = [(whole.step(r, loss), whole.lr, whole.stopped_at) for r, loss in enumerate(losses, 1)]
    first = PlateauSchedule(lr=1e-3, federation=federation)
    resumed_decisions = [(first.step(r, loss), first.lr, first.stopped_at)
                         for r, loss in enumerate(losses[:4], 1)]
    resumed = PlateauSchedule(lr=1e-3, federation=federation)
    resumed.load_state_dict(first.state_dict())
    resumed_decisions += [(resumed.step(r, loss), resumed.lr, resumed.stopped_at)
                          for r, loss in enumerate(losses[4:], 5)]
    assert resumed_decisions == decisions
    assert whole.stopped_at is not None and resumed.best_round == whole.best_round


def test_auc_selection_keeps_the_round_that_ranks_best_while_the_loss_rises():
    # BreastMNIST at alpha = 0.1 (docs/BENCHMARKS.md): the head grows over-confident on skewed
    # sites, so their loss rises round after round while the ranking (AUC) keeps improving.
    losses, aucs = [1.29, 1.50, 1.65, 1.58, 1.73], [0.60, 0.66, 0.70, 0.71, 0.74]
    by_loss, by_auc = _schedule(smoothing=0.5), _schedule(smoothing=0.5)
    for server_round, (loss, auc) in enumerate(zip(losses, aucs), start=1):
        by_loss.step(server_round, selection_score(loss=loss, auc=auc, criterion="loss"))
        by_auc.step(server_round, selection_score(loss=loss, auc=auc, criterion="auc"))
    assert by_loss.best_round == 1 and by_auc.best_round == 5


def test_selection_score_falls_back_to_the_loss_where_auc_is_undefined():
    assert selection_score(loss=0.4, auc=0.9, criterion="auc") == pytest.approx(0.1)
    assert selection_score(loss=0.4, auc=math.nan, criterion="auc") == 0.4
    assert selection_score(loss=0.4, auc=None, criterion="auc") == 0.4
    assert selection_score(loss=0.4, auc=0.9, criterion="loss") == 0.4
    assert math.isnan(selection_score(loss=None, auc=None, criterion="loss"))
