"""`medfed simulate`: every requested mode trained on the same sites, seeds and test sets.

Modes: `federated` (the configured strategy on Flower), `centralized` (the pooled training data),
`local` (each site alone), `scratch` (federated without transfer learning: same architecture,
random initialisation, every layer trained) and `classical` (SVM and random forest on pixels and
on frozen pretrained CNN features). For each seed (and fold, and training fraction) the data is
split once and every mode sees exactly that split.

What each mode's models predict on every validation and test split is saved
(`predictions.npz`), with the models and the sites' data, so the evidence report
(`simulations.evidence`) is computed from files and `medfed report RUN_DIR` can rebuild it.
Outputs go to `<out>.incomplete`, renamed to `<out>` once the report exists: a directory named
`<out>` is always a finished comparison.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from medfed.common import features
from medfed.common.config import Config
from medfed.common.config_checks import comparison_plan
from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.files import claim_run_dir, save_torch, write_json
from medfed.common.device import loader_options, pick_device, place_model
from medfed.common.inference import predict
from medfed.common.model import build_model, load_saved_model
from medfed.common.splits import subsample
from medfed.common.transforms import build_transform
from medfed.simulations import baselines
from medfed.simulations.evidence import RUNS_FILE, write_evidence
from medfed.client.site_data import simulated_site_name, state_dir
from medfed.common.schedule import HEAD, Stages
from medfed.simulations.run import Prepared, prepare, run_federation, save_sites


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a comparison; `kept` is its unfinished `<out>.incomplete` directory, left
    as it is."""

    def __init__(self, kept: Path):
        super().__init__(str(kept))
        self.kept = kept


def simulate(config: Config, *, progress=print, verbose: bool = False) -> tuple[Path, dict]:
    """Run the comparison of a resolved config (`config_checks.resolve`); Ctrl-C once
    `<out>.incomplete` exists raises `Interrupted`."""
    modes, seeds, fractions = comparison_plan(config)
    folds = config.evidence.folds
    fold_list = [(i, folds) for i in range(folds)] if folds else [None]
    first_config = copy.deepcopy(config)
    first_config.seed = seeds[0]
    first = prepare(first_config, fold=fold_list[0])
    # What config.yaml and the report record: the sites found (a natural partition's come from
    # the data) and where the comparison went.
    config = copy.deepcopy(config)
    config.partition.sites = len(first.sites)
    out = Path(config.out) if config.out else _default_out(config)
    staging = claim_run_dir(out)  # refuses, never deletes, what an earlier run left there
    config.out = str(out)
    (staging / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    try:
        return _compare(config, first, modes=modes, seeds=seeds, fold_list=fold_list,
                        fractions=fractions, out=out, staging=staging, progress=progress,
                        verbose=verbose)
    except KeyboardInterrupt:
        raise Interrupted(staging) from None


def _compare(config: Config, first: Prepared, *, modes: list[str], seeds: list[int], fold_list: list,
             fractions: list[float], out: Path, staging: Path, progress,
             verbose: bool) -> tuple[Path, dict]:
    folds = config.evidence.folds
    _announce(first, progress)
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        for fold in fold_list:
            run_config = copy.deepcopy(config)
            run_config.seed = seed
            prepared = first if (seed, fold) == (seeds[0], fold_list[0]) else prepare(run_config, fold=fold)
            for fraction in fractions:
                name = _run_name(seed, fold, fraction, fractions=len(fractions))
                progress(f"== {name}: {', '.join(modes)}")
                runs.append(run_modes(_with_fraction(prepared, fraction, seed=seed), run_config,
                                      modes=modes, run_dir=staging / name, progress=progress,
                                      verbose=verbose) | {"dir": name, "seed": seed,
                                                          "fold": None if fold is None else fold[0],
                                                          "fraction": fraction})
    write_json(staging / RUNS_FILE, {
        "config": config.to_dict(), "dataset": first.dataset, "partition": first.partition,
        "modes": _mode_names(modes), "seeds": seeds, "folds": folds or None,
        "train_fractions": fractions, "runs": runs, "wall_s": time.perf_counter() - started,
    })
    report = write_evidence(staging)
    staging.rename(out)
    return out, report


def run_modes(prepared: Prepared, config: Config, *, modes: list[str], run_dir: Path,
              progress, verbose: bool) -> dict:
    """Train every mode on one split; save predictions and models under `run_dir`."""
    sites_dir = run_dir / "sites"
    save_sites(prepared, sites_dir)
    device = pick_device(config.train.device)
    num_classes = len(prepared.dataset["classes"])
    frozen = FrozenFeatures(prepared, config, sites_dir=sites_dir, device=device)
    predictions: dict[str, np.ndarray] = {}
    entry = {"sites": _site_summary(prepared, num_classes), "modes": {}}
    for mode in modes:
        started = time.perf_counter()
        if mode in ("federated", "scratch"):
            mode_config = _scratch(config) if mode == "scratch" else config
            report = run_federation(prepared, mode_config, run_dir=run_dir / mode, sites_dir=sites_dir,
                                    progress=progress, verbose=verbose)
            model = load_saved_model(run_dir / mode / "global_model.pt", num_classes=num_classes)
            head_only = mode == "federated" and Stages.of_config(config).of(report["final"]["model_round"]) == HEAD
            predictions |= _predict_all(model, prepared, config=mode_config, device=device,
                                        prefix=f"{mode}|global", frozen=frozen if head_only else None)
            entry["modes"][mode] = {"history": _federated_history(report),
                                    "bytes": _bytes(report)}
        elif mode == "centralized":
            progress("centralized: pooled training data of all sites")
            model = build_model(config.model, num_classes=num_classes, seed=config.seed)
            history = baselines.train_epochs(model, _pool(prepared, "train"), _pool(prepared, "val"),
                                             config=config, seed=config.seed, device=device,
                                             what="centralized", sites=len(prepared.sites),
                                             frozen=frozen.pooled() if frozen.used else None)
            _save_model(model, run_dir / "centralized" / "model.pt", config=config)
            predictions |= _predict_all(model, prepared, config=config, device=device,
                                        prefix="centralized|global",
                                        frozen=frozen if _head_only(history) else None)
            entry["modes"][mode] = {"history": history, "bytes": None}
        elif mode == "local":
            for site, splits in prepared.sites.items():
                progress(f"local: {site} alone ({len(splits['train'])} training images)")
                model = build_model(config.model, num_classes=num_classes, seed=config.seed)
                history = baselines.train_epochs(model, splits["train"], splits["val"],
                                                 config=config, seed=config.seed, device=device,
                                                 what=f"local {site}",
                                                 frozen=frozen.site(site) if frozen.used else None)
                predictions |= _predict_all(model, prepared, config=config, device=device,
                                            prefix=f"local|{site}", only_site=site,
                                            frozen=frozen if _head_only(history) else None)
            entry["modes"][mode] = {"history": None, "bytes": None}
        else:
            progress("classical: SVM and random forest on pixels and on frozen CNN features")
            for variant, (values, wall) in _classical(prepared, config, frozen=frozen).items():
                predictions |= values
                entry["modes"][f"classical-{variant}"] = {"history": None, "bytes": None,
                                                          "wall_s": wall}
            continue
        entry["modes"][mode]["wall_s"] = time.perf_counter() - started
    np.savez_compressed(run_dir / "predictions.npz", **predictions)
    return entry


def _mode_names(modes: list[str]) -> list[str]:
    """Report names: `classical` stands for its four variants."""
    return [n for m in modes for n in ([f"classical-{v}" for v in baselines.CLASSICAL]
                                       if m == "classical" else [m])]


def _scratch(config: Config) -> Config:
    """Same architecture without ImageNet weights; frozen random layers would be meaningless,
    so every layer trains."""
    scratch = copy.deepcopy(config)
    scratch.model.weights, scratch.model.freeze = "none", "0"
    scratch.federation.head_rounds = 0
    return scratch


def _prediction_sets(prepared: Prepared, only_site: str | None) -> dict[str, LabelledImages]:
    sets = {"global/test": prepared.global_test}
    for site, splits in prepared.sites.items():
        if only_site is None or site == only_site:
            sets[f"{site}/val"] = splits["val"]
            sets[f"{site}/test"] = splits["test"]
    return sets


def _predict_all(model, prepared: Prepared, *, config: Config, device: torch.device, prefix: str,
                 only_site: str | None = None, frozen: FrozenFeatures | None = None
                 ) -> dict[str, np.ndarray]:
    """Labels and class probabilities of `model` on every split it is judged on; from the frozen
    features when only its classifier was trained (the same numbers, without the backbone)."""
    transform = build_transform(model, config.data, train=False)
    out = {}
    for name, data in _prediction_sets(prepared, only_site).items():
        if frozen is not None:
            values, labels = frozen.named(name)
            dataset = torch.utils.data.TensorDataset(torch.from_numpy(values),
                                                     torch.from_numpy(labels.astype(np.int64)))
            loader = torch.utils.data.DataLoader(dataset, batch_size=config.train.batch_size * 2,
                                                 **loader_options(device))
            y, probs, _ = predict(features.classifier(model).to(device), loader, device)
        else:
            loader = torch.utils.data.DataLoader(TransformedImages(data, transform),
                                                 batch_size=config.train.batch_size * 2,
                                                 **loader_options(device))
            y, probs, _ = predict(place_model(model, device), loader, device)
        out[f"{prefix}|{name}|y"], out[f"{prefix}|{name}|p"] = y, probs.astype(np.float32)
    model.cpu()
    return out


def _head_only(history: list[dict]) -> bool:
    """Whether the kept model came from a head round (or is the model as built)."""
    return all(h["stage"] == HEAD for h in history if h["kept"])


class FrozenFeatures:
    """Every split's frozen features for one seed's sites, computed once and shared by all
    modes: the same per-site cache files the federated run's virtual sites read and write
    (client/site_data.state_dir), so no image goes through the frozen backbone twice."""

    def __init__(self, prepared: Prepared, config: Config, *, sites_dir: Path,
                 device: torch.device) -> None:
        self.prepared, self.config, self.device, self.sites_dir = prepared, config, device, sites_dir
        self.used = Stages.of_config(config).head_rounds > 0
        self.model = build_model(config.model, num_classes=len(prepared.dataset["classes"]),
                                 seed=config.seed)
        self.dirs = {site: state_dir({}, sites_dir / f"{simulated_site_name(i)}.npz") / "features"
                     for i, site in enumerate(prepared.sites)}
        self.dirs["global"] = sites_dir / "global-state" / "features"
        self.frozen = features.FrozenLayers(lambda: self.model, config=config, device=device)

    def plain(self) -> FrozenFeatures:
        """The same sites' features of the plain images only (no augmented views)."""
        config = copy.deepcopy(self.config)
        config.train.feature_views = 0
        return FrozenFeatures(self.prepared, config, sites_dir=self.sites_dir, device=self.device)

    def _of(self, owner: str, data: LabelledImages, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return self.frozen.features(data, train=train, cache_dir=self.dirs[owner])

    def site(self, site: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        splits = self.prepared.sites[site]
        return {split: self._of(site, splits[split], train=split == "train")
                for split in ("train", "val")}

    def pooled(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        parts = [self.site(site) for site in self.prepared.sites]
        return {split: (np.concatenate([p[split][0] for p in parts]),
                        np.concatenate([p[split][1] for p in parts])) for split in ("train", "val")}

    def named(self, name: str, *, train: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A prediction set's features by its name: `global/test`, `<site>/<split>`."""
        owner, split = name.rsplit("/", 1)
        data = self.prepared.global_test if owner == "global" else self.prepared.sites[owner][split]
        return self._of(owner, data, train=train)


def _classical(prepared: Prepared, config: Config, *, frozen: FrozenFeatures) -> dict[str, dict]:
    """Predictions and wall time of each classical variant, trained on the pooled training data.

    Features are computed once per kind (CNN features: the classifier's input, the same frozen
    features the head stage trains on, plain images only); a variant's time is its features'
    time plus its own fitting and prediction, i.e. what it would cost alone (a cached feature
    file costs only its reading)."""
    sets = {"train": _pool(prepared, "train"), **_prediction_sets(prepared, None)}
    cnn = frozen.plain()
    extract = {
        "pixels": lambda name, data: baselines.pixel_features(data),
        "cnn": lambda name, data: (np.concatenate([cnn.named(f"{site}/train")[0]
                                                   for site in prepared.sites])
                                   if name == "train" else cnn.named(name)[0]),
    }
    computed, feature_time = {}, {}
    for source, function in extract.items():
        started = time.perf_counter()
        computed[source] = {name: function(name, data) for name, data in sets.items()}
        feature_time[source] = time.perf_counter() - started
    results = {}
    for variant in baselines.CLASSICAL:
        kind, source = variant.split("-")
        started = time.perf_counter()
        model = baselines.classical_model(kind, seed=config.seed)
        model.fit(computed[source]["train"], sets["train"].labels)
        values = {}
        for name, data in sets.items():
            if name == "train":
                continue
            probs = np.zeros((len(data), len(prepared.dataset["classes"])), dtype=np.float32)
            probs[:, model.classes_] = model.predict_proba(computed[source][name])
            values[f"classical-{variant}|global|{name}|y"] = data.labels
            values[f"classical-{variant}|global|{name}|p"] = probs
        results[variant] = (values, feature_time[source] + time.perf_counter() - started)
    return results


def _pool(prepared: Prepared, split: str) -> LabelledImages:
    return LabelledImages.pooled([s[split] for s in prepared.sites.values()])


def _with_fraction(prepared: Prepared, fraction: float, *, seed: int) -> Prepared:
    """The same split with only `fraction` of each site's training data (val/test unchanged)."""
    if fraction >= 1.0:
        return prepared
    sites = {}
    for name, splits in prepared.sites.items():
        kept = subsample(splits["train"].labels, fraction=fraction, seed=seed)
        sites[name] = {**splits, "train": splits["train"].subset(kept)}
    return Prepared(prepared.dataset, prepared.partition, sites, prepared.global_test)


def _site_summary(prepared: Prepared, num_classes: int) -> dict:
    return {
        site: {"n": {s: len(d) for s, d in splits.items()},
               "label_histogram": {s: d.histogram(num_classes) for s, d in splits.items()}}
        for site, splits in prepared.sites.items()
    }


def _federated_history(report: dict) -> list[dict]:
    return [
        {"round": r["round"], "val_loss": r["val_loss"],
         "global_auc": (r["global_test"] or {}).get("auc"),
         "sites": {s: {"val_auc": v["val"]["auc"]} for s, v in r["evaluate"].items()}}
        for r in report["rounds"]
    ]


def _bytes(report: dict) -> dict:
    """A run's bytes each way: every round's, and the head start's request for class sums."""
    comm = report["communication"]
    return {direction: int(sum(sum(r["sites"].values()) for r in comm[f"bytes_{direction}_per_round"])
                           + comm["head_start_bytes"][direction])
            for direction in ("up", "down")}


def _save_model(model, path: Path, *, config: Config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(path, {"model": model.state_dict(), "config": config.to_dict()})


def _announce(prepared: Prepared, progress) -> None:
    if prepared.dataset.get("skipped_files"):
        progress(f"--skip-bad: left out {prepared.dataset['skipped_files']} unreadable file(s): "
                 + "; ".join(prepared.dataset["skipped_examples"][:5]))
    classes = len(prepared.dataset["classes"])
    for name, splits in prepared.sites.items():
        labels = np.concatenate([d.labels for d in splits.values()])
        progress(f"{name}: " + ", ".join(f"{s} {len(d)}" for s, d in splits.items())
                 + f" | labels {np.bincount(labels, minlength=classes).tolist()}")


def _run_name(seed: int, fold: tuple[int, int] | None, fraction: float, *, fractions: int) -> str:
    parts = [f"seed-{seed}"]
    if fold is not None:
        parts.append(f"fold-{fold[0]}")
    if fractions > 1:
        parts.append(f"fraction-{fraction:g}")
    return "/".join(parts)


def _default_out(config: Config) -> Path:
    name = Path(config.data.path).name if config.data.path else config.data.dataset
    return Path("runs") / f"{name}-{config.federation.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"

