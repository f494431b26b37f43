"""One federated simulation: split a public dataset (or a hospital-style folder or manifest)
across virtual sites, and run the medfed ServerApp and ClientApp in Flower's Simulation Engine
(Ray backend). `prepare` checks everything that can be checked before training, so bad input
fails before any run directory exists.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.client.site_data import simulated_site_name
from medfed.common.config import Config
from medfed.common.config_checks import check_sites
from medfed.common.dataset import LabelledImages, load_splits, save_splits
from medfed.common.errors import MedfedError, few
from medfed.common.interrupts import sigterm_despite_ray
from medfed.common import messages
from medfed.common.medmnist import data_dir, locate
from medfed.common.medmnist_catalogue import DATASETS
from medfed.common.model import check_model
from medfed.common.privacy import site_plan
from medfed.common.sources import Loaded, discover, load
from medfed.common.splits import split_indices
from medfed.server.app import make_server_app
from medfed.simulations import attacks
from medfed.simulations.partition import partition

CITATION = (
    "MedMNIST v2 (CC BY 4.0): Yang, Shi, Wei, Liu, Zhao, Ke, Pfister, Ni, \"MedMNIST v2 - A "
    "large-scale lightweight benchmark for 2D and 3D biomedical image classification\", "
    "Scientific Data 10, 41 (2023)."
)


@dataclass
class Prepared:
    dataset: dict
    partition: dict
    sites: dict[str, dict[str, LabelledImages]]
    global_test: LabelledImages


def prepare(config: Config, *, fold: tuple[int, int] | None = None) -> Prepared:
    """Check a validated config against the data and the model, and split the data into sites.

    `fold=(i, k)`: each site's test split is its fold i of k (cross-validation). With
    `attack.kind: label-flip` the attacking sites' training labels are poisoned here, so every
    mode trains on the same (poisoned) sites."""
    if config.partition.scheme != "natural":
        check_sites(config, sites=config.partition.sites)  # before any data is read
    if config.data.path:
        prepared = _prepare_collection(config, fold=fold)
    else:
        prepared = _prepare_medmnist(config, fold=fold)
    check_sites(config, sites=len(prepared.sites))
    if config.privacy.dp == "sample":
        for splits in prepared.sites.values():  # each site's DP plan, refused before any training
            site_plan(config, examples=len(splits["train"]))
    prepared.sites = attacks.poison_labels(prepared.sites, config,
                                           num_classes=len(prepared.dataset["classes"]))
    return prepared


def _prepare_medmnist(config: Config, *, fold: tuple[int, int] | None) -> Prepared:
    path = locate(config.data.dataset, config.data.resolution, data_dir(config.data.data_dir))
    info = DATASETS[config.data.dataset]
    classes = info["labels"]
    # Labels outside the dataset's classes are refused here, before training, naming the file.
    official = load_splits(path, num_classes=len(classes), classes_of=f" of {config.data.dataset}")
    if set(official) != {"train", "val", "test"}:
        raise MedfedError(f"{path} lacks one of the official train/val/test splits")
    check_model(config.model, num_classes=len(classes), image_size=config.data.image_size,
                seed=config.seed, dp=config.privacy.dp)
    pool = LabelledImages.pooled([official["train"], official["val"]])
    sites = _split_sites(config, pool, parts=_partition(config, pool.labels), patients=None, fold=fold)
    dataset = {
        "name": config.data.dataset,
        "file": str(path),
        "task": info["task"],
        "classes": classes,
        "resolution": config.data.resolution,
        "official_splits": {s: len(d) for s, d in official.items()},
        "citation": CITATION,
    }
    return Prepared(dataset, _partition_info(config, pool="official train + val",
                                                     global_test="official test split"),
                    sites, official["test"])


def _prepare_collection(config: Config, *, fold: tuple[int, int] | None) -> Prepared:
    """A hospital's folder or manifest: decoded once here, then split like a public dataset."""
    kind, loaded = _decoded(config.data.path, image_size=config.data.image_size,
                            frame=config.data.frame, skip_bad=config.data.skip_bad)
    check_model(config.model, num_classes=len(loaded.classes), image_size=config.data.image_size,
                seed=config.seed, dp=config.privacy.dp)
    present = np.unique(loaded.images.labels)
    if len(present) < 2:
        raise MedfedError(
            f"{config.data.path} has readable images of only one class "
            f"({loaded.classes[present[0]]}); a classifier needs at least two"
        )
    if config.partition.scheme == "natural":
        if loaded.sites is None:
            raise MedfedError(
                f"--partition natural needs a manifest with a 'site' column; {config.data.path} "
                f"has none. Add one, or use iid/dirichlet/quantity/pathological"
            )
        names = sorted(set(loaded.sites))
        if len(names) < 2:
            raise MedfedError(f"the manifest's site column names only {names[0]}; a federation needs 2 or more")
        parts = [np.flatnonzero(loaded.sites == name) for name in names]
    else:
        names = None
        parts = _partition(config, loaded.images.labels, patients=loaded.patients)
    sites = _split_sites(config, loaded.images, parts=parts, patients=loaded.patients, names=names,
                         fold=fold)
    global_test = LabelledImages.pooled([s["test"] for s in sites.values()])
    dataset = {
        "name": Path(config.data.path).name,
        "file": str(Path(config.data.path).resolve()),
        "source": kind,
        "task": "binary-class" if len(loaded.classes) == 2 else "multi-class",
        "classes": loaded.classes,
        "images": len(loaded.images),
        "patients": None if loaded.patients is None else len(set(loaded.patients)),
        "skipped_files": len(loaded.skipped),
        "skipped_examples": [f"{p.file}: {p.reason}" for p in loaded.skipped[:20]],
    }
    info = _partition_info(config, pool="all readable images",
                           global_test="pooled test splits of the sites")
    info["site_split"] += " by patient" if loaded.patients is not None else ""
    return Prepared(dataset, info, sites, global_test)


@functools.lru_cache(maxsize=2)
def _decoded(path: str, *, image_size: int, frame: int | None, skip_bad: bool) -> tuple[str, Loaded]:
    """Decode a folder or manifest once per process: every seed and fold of a comparison splits
    the same images."""
    collection = discover(path)
    return collection.kind, load(collection, image_size=image_size, frame=frame, skip_bad=skip_bad)


def _partition(config: Config, labels: np.ndarray, *, patients: np.ndarray | None = None
               ) -> list[np.ndarray]:
    """Indices of each simulated site; a patient's images always go to one site."""
    p = config.partition
    if p.sites * p.min_examples > len(labels):
        # No draw can work: refused at once, in one short line, before trying 100 partitions.
        most = len(labels) // p.min_examples
        raise MedfedError(
            f"{p.sites:,} sites leave too few examples: each site needs partition.min_examples="
            f"{p.min_examples}, and {len(labels):,} examples are shared out; "
            + (f"use at most {most:,} --sites" if most >= 2 else "lower partition.min_examples")
        )
    if patients is None:
        return partition(labels, scheme=p.scheme, sites=p.sites, alpha=p.alpha,
                         labels_per_site=p.labels_per_site, seed=config.seed, min_size=p.min_examples)
    # Partition patients (labelled by their first image), then hand each site its patients' images.
    _, first, owner = np.unique(patients, return_index=True, return_inverse=True)
    groups = partition(labels[first], scheme=p.scheme, sites=p.sites, alpha=p.alpha,
                       labels_per_site=p.labels_per_site, seed=config.seed)
    return [np.flatnonzero(np.isin(owner, group)) for group in groups]


def _split_sites(config: Config, pool: LabelledImages, *, parts: list[np.ndarray],
                 patients: np.ndarray | None, names: list[str] | None = None,
                 fold: tuple[int, int] | None = None) -> dict[str, dict[str, LabelledImages]]:
    names = names or [simulated_site_name(i) for i in range(len(parts))]
    minimum = config.partition.min_examples
    small = [f"{name}: {len(part)}" for name, part in zip(names, parts) if len(part) < minimum]
    if small:
        raise MedfedError(
            f"{len(parts):,} sites leave too few examples for {len(small):,} of them ({few(small)}; "
            f"minimum partition.min_examples={minimum}) out of {len(pool):,} examples; "
            f"use fewer --sites or a larger --alpha"
        )
    sites = {}
    for name, part in zip(names, parts):
        split = split_indices(pool.labels[part], seed=config.seed, site=name, fold=fold,
                              groups=None if patients is None else patients[part])
        sites[name] = {s: pool.subset(part[positions]) for s, positions in split.items()}
    return sites


def _partition_info(config: Config, *, pool: str, global_test: str) -> dict:
    p = config.partition
    return {
        "scheme": p.scheme, "alpha": p.alpha, "labels_per_site": p.labels_per_site,
        "seed": config.seed, "site_split": "stratified 70/15/15",
        "pool": pool, "global_test": global_test,
    }


def save_sites(prepared: Prepared, sites_dir: Path) -> None:
    """Each site's splits as `site-<i>.npz`, the file its virtual SuperNode reads."""
    sites_dir.mkdir(parents=True, exist_ok=True)
    # Files are named by position: a hospital's site name need not be a safe file name.
    for i, splits in enumerate(prepared.sites.values()):
        save_splits(sites_dir / f"{simulated_site_name(i)}.npz", splits)


def run_federation(prepared: Prepared, config: Config, *, run_dir: Path, sites_dir: Path,
                   progress=print, verbose: bool = False, resume: bool = False) -> dict:
    """The medfed ServerApp and ClientApp on Flower's Simulation Engine; returns the run report.

    `run_dir` receives report.json/md, metrics.csv and global_model.pt; the sites read
    `sites_dir` (written by `save_sites`). `resume` continues from `run_dir`'s checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    server_app = make_server_app(
        config=config, run_dir=run_dir, dataset=prepared.dataset, expected_sites=list(prepared.sites),
        global_test=prepared.global_test, partition=prepared.partition,
        simulated_sites=messages.simulated_sites(sites_dir.resolve(), list(prepared.sites)),
        progress=progress, resume=resume,
        max_site_examples=(max(len(splits["train"]) for splits in prepared.sites.values())
                           if config.privacy.secagg else None),
    )
    _run_engine(server_app, attacks.client_app(config, list(prepared.sites)), config,
                num_sites=len(prepared.sites), verbose=verbose)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise MedfedError(f"the federated run ended without a report; see the log above ({run_dir} kept)")
    return json.loads(report_path.read_text())


def _run_engine(server_app, client_app, config: Config, *, num_sites: int, verbose: bool) -> None:
    # Ray announces a future change of how it hides GPUs from CPU-only actors; medfed relies on
    # today's behaviour (sites given no GPU see none), so the notice is noise for users.
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
    from flwr.simulation import run_simulation

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    s = config.simulation
    gpus = s.gpus_per_site
    if gpus is None:
        gpus = 1.0 / num_sites if torch.cuda.is_available() else 0.0
    with sigterm_despite_ray():
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config={
                "client_resources": {"num_cpus": s.cpus_per_site, "num_gpus": gpus},
                "init_args": {"logging_level": "INFO" if verbose else "ERROR",
                              "log_to_driver": verbose, "include_dashboard": False},
            },
            verbose_logging=verbose,
        )
