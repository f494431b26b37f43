"""Krum, MultiKrum and Bulyan (Flower's) inside medfed's strategy wrapper, against mock replies
with one sign-flipped attacker among honest sites (the update-norm check is off here, so the
strategy alone has to hold)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import Bulyan, Krum, MultiKrum
# task_identity is test_strategy's autouse fixture: imported, it applies here too.
from test_strategy import MockGrid, make_strategy, small_model, task_identity
from test_validation import good_updates, train_reply

from medfed.common import wire
from medfed.common.errors import MedfedError
from medfed.server.aggregation import make_flower_strategy


def robust_round(name: str, *, sites: int, byzantine: int, replying: int | None = None):
    """One round of `sites` sites, the first one attacking (sign-flip, scale 10)."""
    strategy, model, keys = make_strategy(name, sites=sites, byzantine=byzantine)
    strategy.norm_factor = 0.0
    initial = wire.to_record(model, keys)
    messages = sorted(strategy.configure_train(1, initial, ConfigRecord(), MockGrid(range(1, sites + 1))),
                      key=lambda m: m.metadata.dst_node_id)
    start = {k: a.numpy() for k, a in initial.items()}
    updates = good_updates(initial, sites)
    statistics = set(wire.statistic_keys(keys))
    updates[0] = {k: (v if k in statistics else (start[k] - 10 * (v - start[k])).astype(v.dtype))
                  for k, v in updates[0].items()}
    replies = [train_reply(m, arrays=u, site=f"site-{i}")
               for i, (m, u) in enumerate(zip(messages, updates))][:replying or sites]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, arrays, updates, keys


def parameters(keys):
    return [k for k in keys if k not in wire.statistic_keys(keys)]


def test_flower_strategies_are_built_with_the_assumed_attackers():
    config, _ = small_model()
    config.federation.byzantine = 1
    config.federation.strategy = "krum"
    krum = make_flower_strategy(config, num_sites=5)
    assert type(krum) is Krum and krum.num_malicious_nodes == 1 and krum.num_nodes_to_select == 1
    config.federation.strategy = "multikrum"
    multikrum = make_flower_strategy(config, num_sites=5)
    assert type(multikrum) is MultiKrum and multikrum.num_nodes_to_select == 4
    config.federation.strategy = "bulyan"
    assert type(make_flower_strategy(config, num_sites=7)) is Bulyan
    with pytest.raises(MedfedError, match="needs at least 7 sites"):
        make_flower_strategy(config, num_sites=6)


def test_krum_picks_one_honest_update_and_ignores_the_attacker():
    strategy, arrays, updates, keys = robust_round("krum", sites=5, byzantine=1)
    chosen = [i for i in range(5)
              if all(np.allclose(arrays[k].numpy(), updates[i][k]) for k in parameters(keys))]
    assert len(chosen) == 1 and chosen[0] != 0
    assert strategy.rounds[1].selected == [f"site-{chosen[0]}"]  # the report says which


def test_multikrum_averages_the_n_minus_f_honest_updates():
    strategy, arrays, updates, keys = robust_round("multikrum", sites=5, byzantine=1)
    assert strategy.inner.num_nodes_to_select == 4
    assert strategy.rounds[1].selected == [f"site-{i}" for i in range(1, 5)]
    for key in parameters(keys):
        np.testing.assert_allclose(arrays[key].numpy(), np.mean([u[key] for u in updates[1:]], axis=0),
                                   rtol=1e-4, atol=1e-5, err_msg=key)


def test_bulyan_stays_within_the_honest_updates():
    strategy, arrays, updates, keys = robust_round("bulyan", sites=7, byzantine=1)
    # Its Krum stage keeps n - 2f = 5 updates, none of them the attacker's.
    selected = strategy.rounds[1].selected
    assert len(selected) == 5 and "site-0" not in selected, selected
    for key in parameters(keys):
        honest = np.stack([u[key] for u in updates[1:]])
        value = arrays[key].numpy()
        assert (value >= honest.min(axis=0) - 1e-6).all() and (value <= honest.max(axis=0) + 1e-6).all()


def test_fedavg_is_dragged_by_the_same_attacker():
    strategy, arrays, updates, keys = robust_round("fedavg", sites=5, byzantine=0)
    assert strategy.rounds[1].selected is None  # every accepted update counts
    key = parameters(keys)[0]
    honest = np.stack([u[key] for u in updates[1:]])
    assert ((arrays[key].numpy() < honest.min(axis=0) - 1e-3)
            | (arrays[key].numpy() > honest.max(axis=0) + 1e-3)).any()


@pytest.mark.parametrize("name, sites", [("krum", 5), ("multikrum", 5), ("bulyan", 7)])
def test_batchnorm_statistics_under_krum_family_are_the_median(name, sites):
    _, arrays, updates, keys = robust_round(name, sites=sites, byzantine=1)
    for key in wire.statistic_keys(keys):
        np.testing.assert_allclose(arrays[key].numpy(), np.median([u[key] for u in updates], axis=0),
                                   rtol=1e-6, err_msg=key)


def test_bulyan_with_too_few_accepted_updates_leaves_the_model_unchanged(caplog):
    # 7 sites expected (4f + 3 with f = 1), 5 answer: Flower's Bulyan skips the round, medfed says why.
    strategy, arrays, _, _ = robust_round("bulyan", sites=7, byzantine=1, replying=5)
    assert arrays is None
    assert "Bulyan needs 7 accepted updates (4f + 3, f = 1), got 5" in caplog.text
    assert sorted(strategy.rounds[1].train) == [f"site-{i}" for i in range(5)]
