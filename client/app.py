"""The medfed ClientApp: Flower glue around common/training.py and common/inference.py.

Everything a site needs to know arrives in the message (the resolved medfed config as JSON, the
round's learning rate and stage, FedProx's `proximal-mu`), so the same app runs under the
Simulation Engine and on a SuperNode. One message per round: a training message is answered with
the site's evaluation of the global model it received and its update trained from it. In the
head stage both run on the site's cached frozen features (common/features.py). With DP-SGD the
site trains through Opacus and keeps its spend in its own state directory (common/privacy.py);
it refuses to train past its budget. Exceptions are left to Flower, which turns them into error
replies that the strategy skips.
"""

from __future__ import annotations

import copy
import functools
import resource
import time
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from medfed.client.secagg import secure_aggregation
from medfed.client.site_data import load_site, locate_site, state_dir
from medfed.common import features, head_start, messages, privacy, wire
from medfed.common.config import Config
from medfed.common.device import pick_device
from medfed.common.inference import evaluate, evaluate_features
from medfed.common.messages import ARRAYS, EVALUATION, METRICS, PRIVACY, SITE
from medfed.common.model import build_model
from medfed.common.schedule import HEAD, STAGES
from medfed.common.training import Trained, train_head, train_local
from medfed.common.transforms import build_transform

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _template(config_json: str, num_classes: int):
    """The model as the run's config builds it, and the keys each stage exchanges (fixed per run)."""
    config = Config.from_json(config_json)
    model = build_model(config.model, num_classes=num_classes, seed=config.seed)
    return model, {s: wire.exchanged_keys(model, bn=config.model.bn, stage=s) for s in STAGES}


@functools.lru_cache(maxsize=8)
def _privacy_plan(config_json: str, examples: int) -> privacy.SitePlan:
    """A site's DP-SGD plan (fixed per run; finding the noise takes most of a second)."""
    return privacy.site_plan(Config.from_json(config_json), examples=examples)


class _Site:
    """One message's view of the site: its config, data, and the global model it received.

    In the head stage the received classifier is used as it came, a linear layer on the cached
    features: the whole model (timm, its weights) is built only when something needs it, which on
    a later message is nothing (about 3 s less per message on 2 cores, docs/BENCHMARKS.md)."""

    def __init__(self, message: Message, context: Context) -> None:
        self.received = messages.read_round_config(message)
        self.config = self.received.config
        node_config = dict(context.node_config)
        self.name, path = locate_site(node_config, self.received)
        self.state_dir = state_dir(node_config, path)
        self.data = load_site(path, config_json=self.received.config_json,
                              classes=self.received.classes, site=self.name, state=self.state_dir)
        self.arrays = message.content[ARRAYS]
        self.local_state = context.state.get(messages.LOCAL_STATE)
        self.device = pick_device(self.config.train.device)
        self.head = self.received.stage == HEAD
        self.frozen = features.FrozenLayers(lambda: self.model, config=self.config,
                                            device=self.device)
        self.cache_dir = self.state_dir / "features"
        center = message.content.array_records.get(messages.HEAD_CENTER)
        self.center = None if center is None else center["center"].numpy()

    @functools.cached_property
    def model(self):
        """The global model as received: the run's template with the received arrays (and the
        site's own never-sent state) loaded."""
        template, keys = _template(self.received.config_json, self.received.num_classes)
        model = copy.deepcopy(template)
        wire.load_record(model, self.arrays, keys=keys[self.received.stage])
        if self.local_state is not None:
            model.load_state_dict(self.local_state.to_torch_state_dict(), strict=False)
        return model

    @functools.cached_property
    def received_linear(self) -> nn.Linear | None:
        """In the head stage, the received classifier as a linear layer of its own (None when
        it is not one: then the model's own classifier trains)."""
        if not self.head:
            return None
        return wire.linear_classifier(self.arrays, num_classes=self.received.num_classes)

    @property
    def classifier(self) -> nn.Module:
        """What the head stage trains and evaluates."""
        linear = self.received_linear
        return linear if linear is not None else features.classifier(self.model)

    def class_sums(self) -> ArrayRecord:
        """Its per-class sums of training features and their counts, for the head's start."""
        sums, counts = head_start.class_sums(*self.features("train"),
                                             num_classes=self.received.num_classes)
        return ArrayRecord({"sums": Array(sums), "counts": Array(counts)})

    def update(self) -> ArrayRecord:
        """The arrays the site sends back: the stage's keys, in the order received."""
        if self.received_linear is not None:
            return wire.linear_record(self.received_linear, keys=list(self.arrays.keys()))
        _, keys = _template(self.received.config_json, self.received.num_classes)
        return wire.to_record(self.model, keys[self.received.stage])

    def head_features(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's cached features, checked against the classifier that will read them."""
        values, labels = self.features(split)
        linear = self.received_linear  # (the model's own classifier was checked on loading)
        if linear is not None and values.shape[1] != linear.in_features:
            raise ValueError(f"the received classifier takes {linear.in_features} inputs, but "
                             f"this site's frozen features have {values.shape[1]}; the server's "
                             f"and this site's configs differ")
        return values, labels

    def features(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.frozen.features(self.data[split], train=split == "train",
                                    cache_dir=self.cache_dir)

    def evaluation(self):
        """The received model's metrics on the site's validation and test splits."""
        results = {}
        for split in messages.EVALUATED_SPLITS:
            if self.head:
                values, labels = self.head_features(split)
                results[split] = evaluate_features(self.classifier, values, labels,
                                                  batch_size=self.config.train.batch_size,
                                                  device=self.device)
            else:
                results[split] = evaluate(
                    self.model.to(self.device), self.data[split],
                    transform=build_transform(self.model, self.config.data, train=False),
                    batch_size=self.config.train.batch_size, device=self.device)
        histograms = {split: self.data[split].histogram(self.received.num_classes)
                      for split in self.data}
        return messages.evaluation_metrics(results, histograms=histograms,
                                           num_examples=len(self.data["val"]))

    def ledger(self) -> privacy.Ledger | None:
        """The site's privacy spend in this study, with DP-SGD."""
        if self.config.privacy.dp != "sample":
            return None
        plan = _privacy_plan(self.received.config_json, len(self.data["train"]))
        return privacy.Ledger(self.state_dir / "privacy", study=self.received.study, plan=plan)

    def train(self, *, private: privacy.SitePlan | None) -> tuple[Trained, float]:
        """The round's training, and the seconds its optimization steps took."""
        seed = (self.config.seed * 100_003 + self.received.server_round * 1_009
                + zlib.crc32(self.name.encode()) % 1_000)
        common = dict(config=self.config.train, lr=self.received.lr,
                      proximal_mu=self.received.proximal_mu, device=self.device, seed=seed,
                      private=private)
        if self.head:
            values, labels = self.head_features("train")
            started = time.perf_counter()
            trained = train_head(self.classifier, values, labels, **common, center=self.center)
            self.classifier.cpu()
        else:
            transform = build_transform(self.model, self.config.data, train=True, seed=seed)
            started = time.perf_counter()
            trained = train_local(self.model, self.data["train"], transform=transform, **common)
            self.model.cpu()
        return trained, time.perf_counter() - started

    def reply(self, message: Message, **records) -> Message:
        return Message(content=RecordDict({**records, SITE: messages.site_record(self.name)}),
                       reply_to=message)


@app.train(mods=[secure_aggregation])
def train(message: Message, context: Context) -> Message:
    started = time.perf_counter()
    site = _Site(message, context)
    evaluation = site.evaluation()
    ledger = site.ledger()
    if ledger is not None:
        ledger.check(site=site.name)
    trained, train_seconds = site.train(private=None if ledger is None else ledger.plan)
    spend = {}
    if ledger is not None:
        ledger.record(trained.releases)
        spend = {PRIVACY: messages.privacy_metrics(ledger.metrics())}
    # With BatchNorm averaged (the default) a site keeps nothing of its own between rounds, and
    # asking the model which tensors it keeps would build it.
    bn = site.config.model.bn
    local = [] if bn == "avg" else wire.local_keys(site.model, bn=bn)
    if local:
        context.state[messages.LOCAL_STATE] = wire.to_record(site.model, local)
    return site.reply(message, **{
        ARRAYS: site.update(),
        METRICS: messages.train_metrics(
            num_examples=len(site.data["train"]), loss=trained.loss,
            seconds=time.perf_counter() - started, train_seconds=train_seconds,
            peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        EVALUATION: evaluation,
        **spend,
    })


@app.evaluate()
def evaluate_site(message: Message, context: Context) -> Message:
    site = _Site(message, context)
    statistics = {messages.CLASS_SUMS: site.class_sums()} if site.received.statistics else {}
    return site.reply(message, **{METRICS: site.evaluation(), **statistics})


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Which site this node is: the server's roll call before the first round, so it can name
    the sites that did not come."""
    site, _ = locate_site(dict(context.node_config), messages.read_round_config(message))
    return Message(content=RecordDict({SITE: messages.site_record(site)}), reply_to=message)

