"""Where a site's own data comes from.

A deployed SuperNode is started with `--node-config 'site="NAME" data-path="PATH"'`, PATH being a
MedMNIST-layout npz with train/val/test splits, or a folder / CSV manifest of the hospital's own
images, which the site decodes and splits itself (group-aware when patients are known, seeded by
the federation's config, labels numbered by the federation's class list). A simulated site is a
virtual SuperNode with a `partition-id`; the simulation wrote its data to
`<sites-dir>/site-<id>.npz`, whose path arrives in the round config. Nothing read here ever leaves
the process.
"""

from __future__ import annotations

import functools
from pathlib import Path

from medfed.client.image_cache import Request, site_splits
from medfed.common.config import Config
from medfed.common.dataset import SPLITS, LabelledImages, check_labels, load_splits
from medfed.common.messages import RoundConfig
from medfed.common.sources import is_collection


def simulated_site_name(partition_id: int) -> str:
    return f"site-{partition_id}"


def state_dir(node_config: dict, data_file: Path) -> Path:
    """Where the site keeps what it computes once (its decoded images, its frozen-feature
    cache): the SuperNode's `state-dir` (`medfed client` sets it), else a folder beside its data
    file (a simulation's virtual sites, whose data the simulation wrote)."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    return data_file.with_name(f"{data_file.stem}-state")


def locate_site(node_config: dict, received: RoundConfig) -> tuple[str, Path]:
    """(site name, data file) for this node."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
        return str(node_config.get("site", path.stem)), path
    if "partition-id" in node_config and received.sites_dir is not None:
        partition_id = int(node_config["partition-id"])
        file = received.sites_dir / f"{simulated_site_name(partition_id)}.npz"
        # A natural split keeps the hospitals' own names; a synthetic one numbers its sites.
        names = received.site_names
        return (names[partition_id] if names else simulated_site_name(partition_id)), file
    raise ValueError(
        "this SuperNode has no data: start it with --node-config "
        "'site=\"NAME\" data-path=\"/path/to/site.npz\"'"
    )


@functools.lru_cache(maxsize=4)
def load_site(path: Path, *, config_json: str, classes: tuple[str, ...], site: str,
              state: Path) -> dict[str, LabelledImages]:
    """The site's train/val/test splits: an npz's own, or a folder's decoded once into the
    site's `state` directory and read from there (client/image_cache.py)."""
    if is_collection(path):
        request = Request.of(Config.from_json(config_json), classes=classes, site=site)
        return site_splits(path, request=request, state_dir=state)
    splits = load_splits(path)
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} split(s); a site needs train, val and test")
    check_labels(path, splits, len(classes), classes_of=" of the federation")
    return splits

