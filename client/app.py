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

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from medfed.client.site_data import load_site, locate_site
from medfed.common.training import train_local
from medfed.common import messages, wire
from medfed.common.config import Config
from medfed.common.inference import evaluate, pick_device
from medfed.common.messages import ARRAYS, METRICS, SITE
from medfed.common.model import build_model
from medfed.common.transforms import build_transform

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _template(config_json: str, num_classes: int):
    """The model as the run's config builds it, and the keys it exchanges (both fixed per run)."""
    config = Config.from_json(config_json)
    model = build_model(config.model, num_classes=num_classes, seed=config.seed)
    return model, wire.exchanged_keys(model, bn=config.model.bn)


def _prepare(message: Message, context: Context):
    received = messages.read_round_config(message)
    config = received.config
    site, path = locate_site(dict(context.node_config), received)
    data = load_site(path, config_json=received.config_json, classes=received.classes, site=site)
    template, keys = _template(received.config_json, received.num_classes)
    model = copy.deepcopy(template)
    wire.load_record(model, message.content[ARRAYS], keys=keys)
    if messages.LOCAL_STATE in context.state:
        model.load_state_dict(context.state[messages.LOCAL_STATE].to_torch_state_dict(), strict=False)
    return config, received, site, data, model, keys


def _reply(message: Message, site: str, **records) -> Message:
    return Message(content=RecordDict({**records, SITE: messages.site_record(site)}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    config, received, site, data, model, keys = _prepare(message, context)
    seed = config.seed * 100_003 + received.server_round * 1_009 + zlib.crc32(site.encode()) % 1_000
    transform = build_transform(model, config.data, train=True, seed=seed)
    loss = train_local(
        model, data["train"], transform=transform, config=config.train,
        lr=received.lr, proximal_mu=received.proximal_mu,
        device=pick_device(config.train.device), seed=seed,
    )
    model.cpu()
    local = wire.local_keys(model, bn=config.model.bn)
    if local:
        context.state[messages.LOCAL_STATE] = wire.to_record(model, local)
    return _reply(message, site, **{ARRAYS: wire.to_record(model, keys),
                                    METRICS: messages.train_metrics(num_examples=len(data["train"]),
                                                                    loss=loss)})


@app.evaluate()
def evaluate_site(message: Message, context: Context) -> Message:
    config, received, site, data, model, _ = _prepare(message, context)
    transform = build_transform(model, config.data, train=False)
    device = pick_device(config.train.device)
    results = {split: evaluate(model.to(device), data[split], transform=transform,
                               batch_size=config.train.batch_size, device=device)
               for split in messages.EVALUATED_SPLITS}
    histograms = {split: data[split].histogram(received.num_classes) for split in data}
    return _reply(message, site, **{METRICS: messages.evaluation_metrics(
        results, histograms=histograms, num_examples=len(data["val"]))})


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Which site this node is: the server's roll call before the first round, so it can name
    the sites that did not come."""
    site, _ = locate_site(dict(context.node_config), messages.read_round_config(message))
    return _reply(message, site)
