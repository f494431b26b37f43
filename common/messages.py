"""The message contract between the server and a site: every key medfed puts in a Flower message
beyond the arrays themselves (common/wire.py), with the one builder and the one reader of each.

* The round config, sent with every message: the resolved medfed config (JSON), the class list,
  where a simulated site finds its data, and the values Flower or the server's schedule add per
  round (`server-round`, `lr`, `stage`, FedProx's `proximal-mu`).
* One message per round and site: a training reply carries the site's evaluation of the global
  model it received (record `evaluation`) beside its update, so no separate evaluation message
  resends the model; only the last round's aggregate and the final model are evaluated alone.
* The site record in every reply: which site answers (the server trusts it only without a node
  registry, i.e. in simulation).
* The evaluation metric record: `{split}-{metric}` scalars, `{split}-confusion` (the confusion
  matrix flattened row by row) and `{split}-histogram` (labels per class).
* With DP-SGD, a training reply's privacy record: the site's spend over the study so far
  (epsilon, delta, noise multiplier, clipping norm, sample rate, steps, budget).
* The head's start from class means (common/head_start.py): before round 1 the server asks every
  site once for an evaluation with `statistics` set in the round config, answered with the
  site's per-class sums of training features and their counts (record `class-sums`: `sums`,
  `counts`); from then on every head-stage training message carries the
  features' center over all sites (record `head-center`).
* The key under which a site keeps its never-sent state between rounds in Flower's Context.
* Under secure aggregation (`--secagg`), the names of the arrays Flower's legacy fit instruction
  carries unnamed (`array-keys`, in the round config), and the range every update value must lie
  in for SecAgg+'s quantization.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord

from medfed.common.config import Config
from medfed.common.dataset import SPLITS
from medfed.common.metrics import SCALARS
from medfed.common.schedule import FINETUNE

# Flower's own record names (FedAvg's arrayrecord_key / configrecord_key) and medfed's.
ARRAYS, METRICS, CONFIG, SITE = "arrays", "metrics", "config", "site"
EVALUATION = "evaluation"            # a training reply's evaluation of the model it received
PRIVACY = "privacy"                  # a training reply's DP-SGD spend (privacy.dp: sample)
PRIVACY_METRICS = ("epsilon", "delta", "noise-multiplier", "max-grad-norm", "sample-rate", "steps",
                   "budget")
WEIGHT_KEY = "num-examples"          # Flower's FedAvg weighs replies by this metric
TRAIN_LOSS = "train-loss"
COMPUTE_SECONDS, TRAIN_SECONDS, PEAK_MB = "compute-s", "train-s", "peak-mb"
EVALUATED_SPLITS = ("val", "test")
CLASS_SUMS = "class-sums"            # a statistics reply's per-class feature sums (head start)
HEAD_CENTER = "head-center"          # a head-stage training message's feature center (head start)
STATISTICS = "statistics"            # round config: answer the evaluation with CLASS_SUMS
LOCAL_STATE = "medfed-local-state"   # Context.state key; never on the wire
ARRAY_KEYS = "array-keys"            # --secagg: the legacy fit instruction's array names, in order
# --secagg: SecAgg+ clips each value of an update to +/- this before quantizing it into 2**22
# levels (Flower's default); a site refuses to send an update beyond it rather than have it clipped.
SECAGG_RANGE = 8.0


def round_config(config: Config, *, classes: list[str], study: str,
                 simulated: dict | None = None) -> dict:
    """What every message of a run carries besides the arrays; `study` names the study (the
    same after a resume: a site keeps its privacy spend under it); `simulated` (from
    `simulated_sites`) tells virtual sites where their data lies."""
    return {"medfed-config": config.to_json(), "classes": list(classes), "study": study,
            **(simulated or {})}


def study_id(run_dir: Path) -> str:
    """A study's name: the server's run directory, so a resumed study keeps it whatever its
    config says, and one started again from scratch in the same place is charged to the same
    privacy budget (never a fresh one)."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def simulated_sites(sites_dir: Path, site_names: list[str]) -> dict:
    """Where the virtual sites of a simulation find their data, and their names."""
    return {"sites-dir": str(sites_dir), "site-names": list(site_names)}


def with_round_values(config: ConfigRecord, round_values: dict, *, lr: float, stage: str
                      ) -> ConfigRecord:
    """The round config as sent: Flower's per-round values, the run's, the scheduled rate and
    the stage (which keys travel and what the site trains)."""
    return ConfigRecord({**config, **round_values, "lr": lr, "stage": stage})


@dataclass(frozen=True)
class RoundConfig:
    """The round config as a site reads it."""

    config_json: str
    classes: tuple[str, ...]
    study: str
    server_round: int
    lr: float | None
    stage: str
    proximal_mu: float
    sites_dir: Path | None
    site_names: tuple[str, ...]
    statistics: bool = False

    @property
    def config(self) -> Config:
        return Config.from_json(self.config_json)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_round_config(message: Message) -> RoundConfig:
    values = message.content[CONFIG]
    return RoundConfig(
        config_json=str(values["medfed-config"]),
        classes=tuple(values["classes"]),
        study=str(values.get("study", "")),
        server_round=int(values.get("server-round", 0)),
        lr=float(values["lr"]) if "lr" in values else None,
        stage=str(values.get("stage", FINETUNE)),
        proximal_mu=float(values.get("proximal-mu", 0.0)),
        sites_dir=Path(str(values["sites-dir"])) if "sites-dir" in values else None,
        site_names=tuple(values.get("site-names", [])),
        statistics=bool(values.get(STATISTICS, False)),
    )


def site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


def declared_name(reply: Message) -> str | None:
    """The site name a reply gives for itself, if it gives one."""
    if reply.has_content() and SITE in reply.content.config_records:
        name = reply.content.config_records[SITE].get("name")
        return None if name is None else str(name)
    return None


def train_metrics(*, num_examples: int, loss: float, seconds: float, train_seconds: float,
                  peak_mb: float) -> MetricRecord:
    """A training reply's metrics: its examples and loss, and what the message cost the site
    (wall seconds from receiving it to replying, of which the optimization steps alone took
    `train_seconds`; the process's peak resident memory)."""
    return MetricRecord({WEIGHT_KEY: num_examples, TRAIN_LOSS: loss, COMPUTE_SECONDS: seconds,
                         TRAIN_SECONDS: train_seconds, PEAK_MB: peak_mb})


def privacy_metrics(spend: dict[str, float]) -> MetricRecord:
    """A training reply's privacy record (common/privacy.Ledger.metrics)."""
    return MetricRecord({key: float(spend[key]) for key in PRIVACY_METRICS})


def evaluation_metrics(results: dict[str, dict], *, histograms: dict[str, list[int]],
                       num_examples: int) -> MetricRecord:
    """A site's evaluation (`results[split]` from common.inference.evaluate) as one flat record."""
    metrics = MetricRecord({WEIGHT_KEY: num_examples})
    for split, result in results.items():
        metrics[f"{split}-loss"] = result["loss"]
        for name in SCALARS:
            value = result[name]
            metrics[f"{split}-{name}"] = float("nan") if value is None else value
        metrics[f"{split}-confusion"] = np.asarray(result["confusion_matrix"]).ravel().tolist()
    for split, histogram in histograms.items():
        metrics[f"{split}-histogram"] = list(histogram)
    return metrics


def clean(value):
    """A non-finite float as None (JSON has no NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def split_metrics(raw: dict, split: str, num_classes: int) -> dict:
    """One split's metric dict from a site's flat evaluation record (`val-auc`, `val-confusion`...)."""
    result = {name: clean(float(raw[f"{split}-{name}"])) for name in (*SCALARS, "loss")}
    matrix = np.asarray(raw[f"{split}-confusion"], dtype=int).reshape(num_classes, num_classes)
    result["confusion_matrix"] = matrix.tolist()
    result["n"] = int(matrix.sum())
    return result


def label_histograms(raw: dict) -> dict[str, list[int]]:
    """Labels per class of each of a site's splits, from its evaluation record."""
    return {s: [int(v) for v in raw[f"{s}-histogram"]] for s in SPLITS}
