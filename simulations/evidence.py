"""From a finished comparison's saved files to its evidence report.

Input: `runs.json` (config, data, per-run site sizes, training histories, bytes, wall times) and
each run's `predictions.npz`, models and site data, all written by `simulations.compare`.
Output: `report.json`, `report.md`, `report.html` and the Grad-CAM overlays under `gradcam/`.
Every number comes from the saved predictions, so `medfed report RUN_DIR` rebuilds an identical
report without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_curve
from timm.data import resolve_model_data_config

from medfed.common.config_loading import from_dict
from medfed.common.dataset import load_splits
from medfed.common.errors import MedfedError
from medfed.common.files import write_atomic, write_json
from medfed.common.metrics import (
    PER_CLASS_SCALARS, SCALARS, classification_metrics, scarce_class,
)
from medfed.common.schedule import Stages, selection_rule
from medfed.common.model import OFFLINE_IMAGENET, build_model, count_parameters, load_saved_model
from medfed.common.transforms import build_transform
from medfed.common.versions import versions
from medfed.simulations.attacks import describe as describe_attack
from medfed.simulations.gradcam import grad_cam, side_by_side
from medfed.simulations.statistics import (
    at_threshold, bootstrap_ci, mean_std, paired_comparison, youden_threshold,
)
from medfed.simulations.report import render_html, render_markdown

RUNS_FILE = "runs.json"
# Paired comparisons reported when both modes ran: (A, B) reads "A against B".
COMPARISONS = (("federated", "local"), ("federated", "centralized"), ("federated", "scratch"),
               ("centralized", "local"))
# Mode whose model Grad-CAM explains, in order of preference.
GRADCAM_MODES = (("federated", "global_model.pt"), ("centralized", "model.pt"),
                 ("scratch", "global_model.pt"))


def rebuild(run_dir: str | Path) -> dict:
    """`medfed report RUN_DIR`: recompute the report of a finished comparison."""
    run_dir = Path(run_dir)
    if not (run_dir / RUNS_FILE).is_file():
        raise MedfedError(f"{run_dir} is not a finished medfed comparison (no {RUNS_FILE}); give the "
                          f"run directory that `medfed simulate` printed")
    return write_evidence(run_dir)


def write_evidence(run_dir: Path) -> dict:
    meta = json.loads((run_dir / RUNS_FILE).read_text())
    report = build_evidence(run_dir, meta)
    write_json(run_dir / "report.json", report)
    write_atomic(run_dir / "report.md", render_markdown(report))
    write_atomic(run_dir / "report.html", render_html(report, run_dir=run_dir))
    return report


def build_evidence(run_dir: Path, meta: dict) -> dict:
    config = from_dict(meta["config"])
    classes = meta["dataset"]["classes"]
    runs, loaded = [], []
    for number, run in enumerate(meta["runs"]):
        try:
            with np.load(run_dir / run["dir"] / "predictions.npz") as npz:
                predictions = dict(npz)
        except (OSError, ValueError) as exc:
            raise MedfedError(f"{run_dir / run['dir']}: predictions.npz is unreadable ({exc})") from None
        loaded.append(predictions)
        judge = _Judge(predictions, sites=list(run["sites"]), classes=list(classes),
                       min_per_class=config.evidence.min_per_class,
                       resamples=config.evidence.bootstrap, seed=run["seed"], with_roc=number == 0)
        runs.append({
            "seed": run["seed"], "fold": run["fold"], "fraction": run["fraction"], "dir": run["dir"],
            "modes": {mode: {**info, **judge.mode(mode)} for mode, info in run["modes"].items()},
        })
    largest = max(meta["train_fractions"])
    final = [r for r in runs if r["fraction"] == largest]
    # Site sizes with all their training data (the first run may use a fraction of it).
    sites = next(r for r in meta["runs"] if r["fraction"] == largest)["sites"]
    attack = describe_attack(config, list(sites))
    for name in (attack or {}).get("sites", []):
        # Reported, but flagged: an attacker's own numbers are not evidence about the method.
        sites[name] = {**sites[name], "attacker": True}
    report = {
        "kind": "medfed-comparison",
        "config": meta["config"],
        "dataset": meta["dataset"],
        "partition": meta["partition"],
        "modes": meta["modes"],
        "seeds": meta["seeds"],
        "folds": meta["folds"],
        "train_fractions": meta["train_fractions"],
        "budget": _budget(config),
        "model_card": {**_model_card(config, num_classes=len(classes)),
                       "privacy": _privacy_guarantee(run_dir, meta)},
        "sites": sites,
        "attack": attack,
        "runs": runs,
        "summary": _summary(final),
        "headline": _headline(final),
        "statistics": _statistics(final),
        "data_efficiency": _data_efficiency(runs) if len(meta["train_fractions"]) > 1 else None,
        "gradcam": _gradcams(run_dir, meta["runs"][0], loaded[0], config=config, classes=classes),
        "timing": {"wall_s": meta["wall_s"]},
    }
    return report


class _Judge:
    """Metrics, intervals and operating points of one run's saved predictions."""

    def __init__(self, predictions: dict, *, sites: list[str], classes: list[str],
                 min_per_class: int, resamples: int, seed: int, with_roc: bool) -> None:
        self.predictions, self.sites, self.classes = predictions, sites, classes
        self.binary, self.min_per_class = len(classes) == 2, min_per_class
        self.resamples, self.seed, self.with_roc = resamples, seed, with_roc

    def mode(self, mode: str) -> dict:
        if mode == "local":
            return {
                "results": {s: self.result(f"local|{s}", f"{s}/test", val=[f"{s}/val"]) for s in self.sites},
                "local_on_global": {s: self.result(f"local|{s}", "global/test", val=[f"{s}/val"])
                                    for s in self.sites},
            }
        prefix = f"{mode}|global"
        results = {s: self.result(prefix, f"{s}/test", val=[f"{s}/val"]) for s in self.sites}
        results["global"] = self.result(prefix, "global/test", val=[f"{s}/val" for s in self.sites])
        return {"results": results, "local_on_global": None}

    def result(self, prefix: str, test: str, *, val: list[str]) -> dict:
        y, probs = self.predictions[f"{prefix}|{test}|y"], self.predictions[f"{prefix}|{test}|p"]
        ci = bootstrap_ci(y, probs, n_resamples=self.resamples, seed=self.seed)
        result = {
            "metrics": classification_metrics(y, probs),
            "ci": {k: (None if v is None else list(v)) for k, v in ci.items()},
            "operating_points": None,
            "roc": None,
            "not_estimable": scarce_class(y, self.classes, minimum=self.min_per_class),
        }
        if result["not_estimable"]:
            # A handful of images of one class gives a number and an interval that mean nothing
            # (one malignant image ranked first is "AUC 1.000 (1.000-1.000)").
            for name in PER_CLASS_SCALARS:
                result["metrics"][name] = result["ci"][name] = None
        if not self.binary or result["not_estimable"]:
            return result
        val_y = np.concatenate([self.predictions[f"{prefix}|{v}|y"] for v in val])
        val_p = np.concatenate([self.predictions[f"{prefix}|{v}|p"] for v in val])
        # The threshold is chosen on validation data only, then applied unchanged to the test set.
        threshold = youden_threshold(val_y, val_p[:, 1])
        points = {"youden_threshold": threshold,
                  "at_0.5": _sens_spec(at_threshold(y, probs[:, 1], 0.5)),
                  "at_youden": None if threshold is None else _sens_spec(at_threshold(y, probs[:, 1], threshold))}
        result["operating_points"] = points
        if self.with_roc and len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, probs[:, 1])
            result["roc"] = {"fpr": np.round(fpr, 4).tolist(), "tpr": np.round(tpr, 4).tolist()}
        return result


def _sens_spec(point: dict) -> dict:
    return {"sensitivity": point["sensitivity"], "specificity": point["specificity"]}


def _auc(result: dict) -> float | None:
    return result["metrics"]["auc"]


def _best_local(mode: dict) -> dict:
    """The local model that does best on the global test set (the strongest single hospital)."""
    candidates = mode["local_on_global"]
    return max(candidates.values(), key=lambda r: -1.0 if _auc(r) is None else _auc(r))


def _global_result(mode_name: str, mode: dict) -> dict:
    return _best_local(mode) if mode_name == "local" else mode["results"]["global"]


def _summary(runs: list[dict]) -> dict:
    summary = {}
    for mode in runs[0]["modes"]:
        keys = list(runs[0]["modes"][mode]["results"]) + (["global"] if mode == "local" else [])
        summary[mode] = {}
        for key in dict.fromkeys(keys):
            results = [(_global_result(mode, r["modes"][mode]) if key == "global"
                        else r["modes"][mode]["results"][key]) for r in runs]
            summary[mode][key] = {m: mean_std([x["metrics"][m] for x in results]) for m in SCALARS}
    return summary


def _headline(runs: list[dict]) -> dict:
    """The comparisons the benchmarks have targets for, as differences of mean global test AUC."""
    means = {mode: mean_std([_auc(_global_result(mode, r["modes"][mode])) for r in runs])["mean"]
             for mode in runs[0]["modes"]}

    def gap(a: str, b: str) -> float | None:
        if means.get(a) is None or means.get(b) is None:
            return None
        return means[a] - means[b]

    return {"global_auc": means,
            "federated_minus_centralized": gap("federated", "centralized"),
            "federated_minus_best_local": gap("federated", "local"),
            "pretrained_minus_scratch": gap("federated", "scratch")}


def _statistics(runs: list[dict]) -> list[dict]:
    """Paired tests over sites x seeds (site test AUC), plus the global test over seeds."""
    modes = runs[0]["modes"]
    pairs = [p for p in COMPARISONS if p[0] in modes and p[1] in modes]
    pairs += [("federated", m) for m in modes if m.startswith("classical-") and "federated" in modes]
    sites = [s for s in runs[0]["modes"][pairs[0][0]]["results"] if s != "global"] if pairs else []
    out = []
    for a, b in pairs:
        values_a = [_auc(r["modes"][a]["results"][s]) for r in runs for s in sites]
        values_b = [_auc(r["modes"][b]["results"][s]) for r in runs for s in sites]
        out.append({**paired_comparison(values_a, values_b, label_a=a, label_b=b, unit="site-seeds"),
                    "metric": "auc", "scope": "each site's test split"})
    if "federated" in modes and "local" in modes:
        out.append({**paired_comparison([_auc(r["modes"]["federated"]["results"]["global"]) for r in runs],
                                        [_auc(_best_local(r["modes"]["local"])) for r in runs],
                                        label_a="federated", label_b="best local site", unit="seeds"),
                    "metric": "auc", "scope": "global test set"})
    return out


def _data_efficiency(runs: list[dict]) -> dict:
    fractions = sorted({r["fraction"] for r in runs})
    return {
        mode: {f"{f:g}": mean_std([_auc(_global_result(mode, r["modes"][mode]))
                                  for r in runs if r["fraction"] == f]) for f in fractions}
        for mode in runs[0]["modes"]
    }


def _budget(config) -> str:
    t, f = config.train, config.federation
    rounds = f.rounds
    work = (f"{t.local_steps} optimizer steps" if t.local_steps is not None
            else f"{t.local_epochs} local epoch{'s' if t.local_epochs > 1 else ''}")
    stages = Stages.of_config(config).plan(rounds)
    views = (f"; the head trains on {t.feature_views} augmented view(s) per training image"
             if t.feature_views else "")
    return (f"{rounds} rounds x {work} ({stages}{views}): every neural mode gets the same rounds "
            f"and per-round work (centralized: the steps of all sites together), the same "
            f"learning-rate reduction, early stopping and choice of model "
            f"({selection_rule(f.selection)}); scratch trains every layer from random weights; classical models "
            f"are fit once on the pooled training data")


def _privacy_guarantee(run_dir: Path, meta: dict) -> str | None:
    """The federated runs' differential-privacy guarantee in one sentence: the weakest of them
    (the largest epsilon any site spent in any run)."""
    guarantees = []
    for run in meta["runs"]:
        report = run_dir / run["dir"] / "federated" / "report.json"
        if report.is_file():
            privacy = json.loads(report.read_text()).get("privacy") or {}
            spent = [s["epsilon"] for s in privacy.get("sites", {}).values()]
            aggregate = (privacy.get("aggregate") or {}).get("epsilon")
            weakest = max(spent + ([aggregate] if aggregate is not None else []), default=0.0)
            guarantees.append((weakest, privacy.get("guarantee")))
    return max(guarantees, key=lambda g: g[0])[1] if guarantees else None


def _model_card(config, *, num_classes: int) -> dict:
    model = build_model(config.model, num_classes=num_classes, seed=config.seed)
    data_config = resolve_model_data_config(model)
    trainable, total = count_parameters(model)
    weights = config.model.weights
    if weights == "imagenet":
        source = (f"ImageNet, offline package {OFFLINE_IMAGENET[config.model.backbone][0]}"
                  if config.model.backbone in OFFLINE_IMAGENET else "ImageNet, timm hub")
    else:
        source = "random initialisation" if weights == "none" else f"checkpoint {weights}"
    card = {
        "backbone": config.model.backbone, "weights": weights, "weights_source": source,
        "freeze": config.model.freeze, "input_size": config.data.image_size,
        "mean": [float(x) for x in data_config["mean"]], "std": [float(x) for x in data_config["std"]],
        "equalize": config.data.equalize, "trainable_params": trainable, "total_params": total,
        "versions": versions(),
    }
    return card


def _gradcams(run_dir: Path, run_meta: dict, predictions: dict, *, config, classes: list[str]
              ) -> list[dict]:
    """Overlays of the most confident right and wrong test answers per site and true class."""
    per_class = config.evidence.gradcam_per_class
    chosen = next(((m, f) for m, f in GRADCAM_MODES if m in run_meta["modes"]), None)
    if chosen is None or per_class == 0:
        return []
    mode, filename = chosen
    base = run_dir / run_meta["dir"]
    model = load_saved_model(base / mode / filename, num_classes=len(classes)).eval()
    transform = build_transform(model, config.data, train=False)
    out_dir = run_dir / "gradcam"
    out_dir.mkdir(exist_ok=True)
    entries = []
    for index, site in enumerate(run_meta["sites"]):
        test = load_splits(base / "sites" / f"site-{index}.npz")["test"]
        probs = predictions[f"{mode}|global|{site}/test|p"]
        predicted = probs.argmax(axis=1)
        for label in range(len(classes)):
            for correct in (True, False):
                picks = _confident(test.labels, predicted, probs, label=label, correct=correct,
                                   count=(per_class + (1 if correct else 0)) // 2)
                for k, i in enumerate(picks):
                    # The site's image as decoded (a --data DICOM windowed to uint8), the
                    # same pixels the model's transform starts from; only the model sees the
                    # resized, normalised tensor.
                    image = test.images[i]
                    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
                    tensor = transform(image=rgb)["image"]
                    heat = grad_cam(model, tensor, target_class=int(predicted[i]))
                    name = f"gradcam/site{index}-class{label}-{'correct' if correct else 'wrong'}-{k}.png"
                    Image.fromarray(side_by_side(image, heat)).save(run_dir / name)
                    entries.append({"site": site, "true": classes[label],
                                    "predicted": classes[int(predicted[i])],
                                    "probability": round(float(probs[i, predicted[i]]), 4),
                                    "correct": correct, "file": name})
    return entries


def _confident(labels: np.ndarray, predicted: np.ndarray, probs: np.ndarray, *, label: int,
               correct: bool, count: int) -> list[int]:
    mask = (labels == label) & ((predicted == label) if correct else (predicted != label))
    candidates = np.flatnonzero(mask)
    confidence = probs[candidates, predicted[candidates]]
    # Stable sort so ties resolve the same way on every rebuild.
    return candidates[np.argsort(-confidence, kind="stable")][:count].tolist()

