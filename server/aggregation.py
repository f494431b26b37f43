"""The Flower strategy that samples and aggregates: built from the study's config, set each round
to the replies accepted, and the server optimizer's state it carries from round to round (saved in
the checkpoint, restarted when a stage sends other keys)."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan, DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedAvgM, FedMedian,
    FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from medfed.common.config import BYZANTINE_MINIMUM, Config
from medfed.common.config_checks import check_sites
from medfed.server.records import array_record, plain_arrays

log = logging.getLogger("medfed")

DP_WRAPPERS = (DifferentialPrivacyFixedClippingBase,)
# What Flower's server optimizers (FedAvgM, FedAdam, FedYogi) carry from round to round, keyed
# by the arrays they saw: restarted when a new stage sends other keys.
SERVER_OPTIMIZER_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")
# FedAvgM keeps these as ArrayRecords; the checkpoint holds plain arrays.
FEDAVGM_RECORDS = ("current_arrays",)


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


class AggregatedMetrics:
    """Flower's `train_metrics_aggr_fn`: the scalar metrics' example-weighted mean, and a note of
    the records it was given. Krum and MultiKrum give it the updates they selected, Bulyan
    those its Krum stage selected, the others every update: `records` says which ones make
    the global model."""

    def __init__(self) -> None:
        self.records: list[RecordDict] = []

    def __call__(self, records: list[RecordDict], weight_key: str) -> MetricRecord:
        self.records = list(records)
        return mean_scalar_metrics(records, weight_key)


def selected(base: Strategy, contents: dict[str, RecordDict]) -> list[str] | None:
    """The sites (keys of `contents`, each reply's content) whose updates the last aggregation
    of a selecting strategy (Krum, MultiKrum, Bulyan) used; None for the others."""
    if not isinstance(base, (MultiKrum, Bulyan)):
        return None
    used = {id(record) for record in base.train_metrics_aggr_fn.records}
    return sorted(site for site, content in contents.items() if id(content) in used)


def make_flower_strategy(config: Config, *, num_sites: int) -> Strategy:
    f = config.federation
    sampling = dict(
        fraction_train=f.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=max(1, round(f.fraction_train * num_sites)),
        min_evaluate_nodes=num_sites,
        min_available_nodes=num_sites,
        train_metrics_aggr_fn=AggregatedMetrics(),
        evaluate_metrics_aggr_fn=mean_scalar_metrics,
    )
    strategy = _base_strategy(config, sampling=sampling, num_sites=num_sites)
    p = config.privacy
    if p.dp == "client":
        # Flower adds noise of std z * clip / n to the mean of the updates, which ClippedUpdates
        # (server/client_dp.py) has clipped to `clip`: Flower 1.42's server-side clipping wrapper
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


def unwrapped(strategy: Strategy) -> Strategy:
    """The strategy that samples and aggregates: the one a DP wrapper wraps, else `strategy`."""
    return strategy.strategy if isinstance(strategy, DP_WRAPPERS) else strategy


def fit_to_replies(base: Strategy, *, replies: int, server_round: int) -> None:
    """Set the robust strategies for the `replies` accepted updates this round."""
    if isinstance(base, MultiKrum) and not isinstance(base, Krum):
        base.num_nodes_to_select = max(1, replies - base.num_malicious_nodes)
    if isinstance(base, Bulyan) and replies < 4 * base.num_malicious_nodes + 3:
        log.warning("round %d: Bulyan needs %d accepted updates (4f + 3, f = %d), got %d; the "
                    "global model is left unchanged this round", server_round,
                    4 * base.num_malicious_nodes + 3, base.num_malicious_nodes, replies)


def restart_optimizer(base: Strategy) -> None:
    for name in SERVER_OPTIMIZER_STATE:
        if hasattr(base, name):
            setattr(base, name, None)


def optimizer_state(base: Strategy) -> dict:
    """FedAdam/FedYogi (FedOpt) and FedAvgM keep x_t and their moments between rounds."""
    return {name: _plain(getattr(base, name)) for name in SERVER_OPTIMIZER_STATE
            if hasattr(base, name)}


def optimizer_finite(state: dict) -> bool:
    """Whether a server optimizer's state (`optimizer_state`) holds finite numbers only: FedAdam
    and FedYogi square the update, which overflows float32 where the update itself did not."""
    for value in state.values():
        arrays = value.values() if isinstance(value, dict) else value or []
        if not all(np.isfinite(array).all() for array in arrays):
            return False
    return True


def load_optimizer_state(base: Strategy, state: dict) -> None:
    for name, value in state.items():
        setattr(base, name, array_record(value) if name in FEDAVGM_RECORDS
                and isinstance(base, FedAvgM) else value)


def _plain(value):
    return plain_arrays(value) if isinstance(value, ArrayRecord) else value
