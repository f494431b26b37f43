"""The medfed ClientApp: Flower glue around `training.train_local` and `inference.evaluate`.

Everything a site needs to know arrives in the message (the resolved medfed config as JSON, the
round's learning rate, FedProx's `proximal-mu`), so the same app runs under the Simulation Engine
and on a SuperNode. Exceptions are left to Flower, which turns them into error replies that the
strategy skips.
"""

from __future__ import annotations

import copy
import functools
import zlib

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfed.client.site_data import load_site, locate_site
from medfed.client.training import train_local
from medfed.common import wire
from medfed.common.config import Config
from medfed.common.inference import evaluate, pick_device
from medfed.common.metrics import SCALARS
from medfed.common.model import build_model
from medfed.common.transforms import build_transform

app = ClientApp()

LOCAL_STATE = "medfed-local-state"


@functools.lru_cache(maxsize=2)
def _template(config_json: str, num_classes: int):
    config = Config.from_json(config_json)
    return build_model(config.model, num_classes=num_classes, seed=config.seed)


def _prepare(message: Message, context: Context):
    round_config = message.content["config"]
    config_json = str(round_config["medfed-config"])
    config = Config.from_json(config_json)
    num_classes = int(round_config["num-classes"])
    site, path = locate_site(dict(context.node_config), dict(round_config))
    data = load_site(path, config_json=config_json, classes=tuple(round_config["classes"]), site=site)
    model = copy.deepcopy(_template(config_json, num_classes))
    keys = wire.exchanged_keys(model, bn=config.model.bn)
    wire.load_record(model, message.content["arrays"], keys=keys)
    if LOCAL_STATE in context.state:
        model.load_state_dict(context.state[LOCAL_STATE].to_torch_state_dict(), strict=False)
    return config, round_config, site, data, model, keys, num_classes


def _site_record(site: str) -> ConfigRecord:
    return ConfigRecord({"name": site})


@app.train()
def train(message: Message, context: Context) -> Message:
    config, round_config, site, data, model, keys, _ = _prepare(message, context)
    server_round = int(round_config["server-round"])
    seed = config.seed * 100_003 + server_round * 1_009 + zlib.crc32(site.encode()) % 1_000
    transform = build_transform(model, config.data, train=True, seed=seed)
    loss = train_local(
        model, data["train"], transform=transform, config=config.train,
        lr=float(round_config["lr"]), proximal_mu=float(round_config.get("proximal-mu", 0.0)),
        device=pick_device(config.train.device), seed=seed,
    )
    model.cpu()
    local = wire.local_keys(model, bn=config.model.bn)
    if local:
        context.state[LOCAL_STATE] = wire.to_record(model, local)
    metrics = MetricRecord({"num-examples": len(data["train"]), "train-loss": loss})
    content = RecordDict(
        {"arrays": wire.to_record(model, keys), "metrics": metrics, "site": _site_record(site)}
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate_site(message: Message, context: Context) -> Message:
    config, _, site, data, model, _, num_classes = _prepare(message, context)
    transform = build_transform(model, config.data, train=False)
    device = pick_device(config.train.device)
    metrics = MetricRecord({"num-examples": len(data["val"])})
    for split in ("val", "test"):
        result = evaluate(model.to(device), data[split], transform=transform,
                          batch_size=config.train.batch_size, device=device)
        metrics[f"{split}-loss"] = result["loss"]
        for name in SCALARS:
            value = result[name]
            metrics[f"{split}-{name}"] = float("nan") if value is None else value
        metrics[f"{split}-confusion"] = np.asarray(result["confusion_matrix"]).ravel().tolist()
    for split in ("train", "val", "test"):
        metrics[f"{split}-histogram"] = data[split].histogram(num_classes)
    content = RecordDict({"metrics": metrics, "site": _site_record(site)})
    return Message(content=content, reply_to=message)


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Which site this node is: the server's roll call before the first round, so it can name
    the sites that did not come."""
    site, _ = locate_site(dict(context.node_config), dict(message.content["config"]))
    return Message(content=RecordDict({"site": _site_record(site)}), reply_to=message)
