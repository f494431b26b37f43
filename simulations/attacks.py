"""Simulated attacks: `medfed simulate --attack KIND --attackers K` (config section `attack`).

The first K virtual sites attack; the others train honestly. Model poisoning (sign-flip, scaled,
noise) is a Flower ClientApp mod wrapped around the train function of a ClientApp built here for
the Simulation Engine only: it lets the site train as usual, then rewrites the arrays of the reply
when the reply comes from an attacker. Data poisoning (label-flip) rewrites the attackers'
training labels before the sites' files are written, so every mode that trains on their data sees
the same poisoned labels. Under secure aggregation an attacker's update is masked like any other:
the server cannot tell it apart. The deployed ClientApp (`medfed.client.app.app`) has no mods, and
`medfed server start` refuses a config with an attack (`common.config_checks.check_deployment`).

What an attacker sends back (g: the global arrays it received, w: what it trained, s: scale):

* sign-flip: g - s * (w - g), the update reversed and scaled;
* scaled: g + s * (w - g);
* noise: g + n, n Gaussian with, per tensor, standard deviation s x the root mean square of the
  real update w - g (seeded by the run's seed, the round and the site).

Only floating-point trainable parameters are rewritten; BatchNorm running statistics go back as
trained (a sign-flipped running variance would be negative, a NaN generator rather than an attack
on learning).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from medfed.common import wire
from medfed.common.config import Config
from medfed.common.dataset import LabelledImages
from medfed.server.validation import declared_name

MODEL_POISONING = ("sign-flip", "scaled", "noise")


def attacker_sites(config: Config, sites: list[str]) -> list[str]:
    """The attacking sites: the first `attack.sites` of the study's sites (none without an attack)."""
    return [] if config.attack.kind == "none" else list(sites[:config.attack.sites])


def describe(config: Config, sites: list[str]) -> dict | None:
    """The attack as the reports state it; None without one."""
    a = config.attack
    if a.kind == "none":
        return None
    effect = {
        "sign-flip": f"each attacker sends global - {a.scale:g} x (its update)",
        "scaled": f"each attacker sends global + {a.scale:g} x (its update)",
        "noise": f"each attacker sends Gaussian noise {a.scale:g} x the size of its update",
        "label-flip": "each attacker trains on wrong labels (class y becomes class y + 1)",
    }[a.kind]
    return {"kind": a.kind, "scale": a.scale if a.kind in MODEL_POISONING else None,
            "sites": attacker_sites(config, sites), "effect": effect}


def poison(received: dict[str, np.ndarray], trained: dict[str, np.ndarray], *, kind: str,
           scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The arrays an attacker sends instead of `trained`, having received `received`."""
    statistics = set(wire.statistic_keys(list(trained)))
    out = {}
    for key, value in trained.items():
        if key in statistics or key not in received or not np.issubdtype(value.dtype, np.floating):
            out[key] = value
            continue
        start = received[key].astype(np.float64)
        update = value.astype(np.float64) - start
        if kind == "sign-flip":
            attacked = start - scale * update
        elif kind == "scaled":
            attacked = start + scale * update
        elif kind == "noise":
            rms = float(np.sqrt(np.mean(update ** 2))) if update.size else 0.0
            attacked = start + rng.normal(0.0, scale * rms, size=update.shape)
        else:
            raise ValueError(f"not a model-poisoning attack: {kind}")
        out[key] = attacked.astype(value.dtype)
    return out


@dataclass(frozen=True)
class UpdateAttack:
    """The ClientApp mod: rewrites the train replies of the attacking sites, by site name."""

    kind: str
    scale: float
    sites: frozenset[str]
    seed: int = 0

    def __call__(self, message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:
            return call_next(message, context)
        received = {k: np.array(a.numpy(), copy=True) for k, a in message.content["arrays"].items()}
        reply = call_next(message, context)
        if reply.has_error() or not reply.has_content():
            return reply
        site = declared_name(reply)
        if site not in self.sites:
            return reply
        server_round = int(message.content["config"].get("server-round", 0))
        rng = np.random.default_rng([self.seed, server_round, zlib.crc32(site.encode())])
        trained = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        attacked = poison(received, trained, kind=self.kind, scale=self.scale, rng=rng)
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                               for k, v in attacked.items()})
        return reply


def client_app(config: Config, sites: list[str]) -> ClientApp:
    """The ClientApp the Simulation Engine runs: medfed's own, or, when some of `sites` poison
    their updates, one whose train handler has the attack mod inside medfed's secure-aggregation
    mod (client/secagg.py), so an attacker's update is what SecAgg+ masks."""
    from medfed.client import app as medfed_client
    from medfed.client.secagg import secure_aggregation

    attackers = attacker_sites(config, sites)
    if config.attack.kind not in MODEL_POISONING or not attackers:
        return medfed_client.app
    app = ClientApp()
    app.train(mods=[secure_aggregation,
                    UpdateAttack(kind=config.attack.kind, scale=config.attack.scale,
                                 sites=frozenset(attackers), seed=config.seed)])(medfed_client.train)
    app.evaluate()(medfed_client.evaluate_site)
    app.query()(medfed_client.identify)
    return app


def poison_labels(sites: dict[str, dict[str, LabelledImages]], config: Config, *, num_classes: int
                  ) -> dict[str, dict[str, LabelledImages]]:
    """label-flip: the attackers' training labels y become (y + 1) mod classes; their validation
    and test splits, and every honest site, are left as they are."""
    if config.attack.kind != "label-flip":
        return sites
    out = dict(sites)
    for name in attacker_sites(config, list(sites)):
        train = sites[name]["train"]
        out[name] = {**sites[name],
                     "train": LabelledImages(train.images, (train.labels + 1) % num_classes)}
    return out
