"""A site's images decoded once: arrays on disk in its own state directory.

Flower's SuperNode starts a fresh ClientApp process for every message, so whatever a site keeps
only in memory is gone at the next one. A hospital folder of full-size DICOM radiographs would
then be decoded, resized and split again twice per round. Instead the first message decodes the
folder one file at a time into an array on disk, splits it, and writes one array per split;
later messages read those arrays a batch at a time (common/disk_images.py), so the site's
resident memory does not grow with its folder.

The cache lives under `<state-dir>/images/<key>/`, the key being a hash of everything the arrays
depend on: each file's path, label, site, patient, size and modification time; the
preprocessing settings; the federation's class list; the split seed and site name; the medfed
version. A change in any of them makes a new folder, and the line that says so names what
changed. A folder is written under a temporary name and renamed when complete, so a half-written
cache is never used; when the disk fills, the site decodes in memory for this message and says
so. Nothing here leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.common.config import Config
from medfed.common.dataset import SPLITS, LabelledImages
from medfed.common.disk_images import DiskImages, DiskImagesWriter
from medfed.common.errors import MedfedError, few
from medfed.common.sources import Collection, Decoded, decode_resized, discover, load
from medfed.common.splits import split_indices

CACHE_VERSION = 1
META = "meta.json"
PARTIAL = ".partial-"
# A partial cache nobody has written to for this long belongs to a process that was killed.
ABANDONED_S = 3600.0


@dataclass(frozen=True)
class Request:
    """What the arrays depend on besides the files themselves."""

    image_size: int
    frame: int | None
    skip_bad: bool
    classes: tuple[str, ...]
    seed: int
    site: str

    @staticmethod
    def of(config: Config, *, classes, site: str) -> Request:
        return Request(image_size=config.data.image_size, frame=config.data.frame,
                       skip_bad=config.data.skip_bad, classes=tuple(classes), seed=config.seed,
                       site=site)


def site_splits(path: Path, *, request: Request, state_dir: Path, log=None
                ) -> dict[str, LabelledImages]:
    """The train/val/test splits of the folder or manifest at `path`, read from the
    cache in `state_dir`, decoded into it first when it has none for these files and settings."""
    log = log if log is not None else sys.stderr
    collection = discover(path, classes=list(request.classes))
    wanted = _key(collection, request)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:24]
    root = state_dir / "images"
    folder = root / digest
    if (folder / META).is_file():
        return _open(folder)
    print(f"decoding {len(collection.records):,} images of {path} once into {folder}"
          f"{_why_new(root, wanted)}", file=log, flush=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=root))
    except OSError as exc:
        raise MedfedError(f"cannot write the site's image cache under {root}: "
                          f"{exc.strerror or exc}; give --state-dir a writable folder") from None
    try:
        _build(collection, request=request, folder=partial, meta=wanted, log=log)
        os.replace(partial, folder)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if (folder / META).is_file():  # another process of this site finished it first
            return _open(folder)
        print(f"could not write the image cache in {root} ({exc.strerror or exc}); this message "
              f"decodes in memory, and so will the next ones until there is room", file=log,
              flush=True)
        return _in_memory(collection, request=request, log=log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _tidy(root, keep=folder)
    return _open(folder)


def _tidy(root: Path, *, keep: Path) -> None:
    """Remove caches for other files or settings (a state directory keeps only the current one)
    and partial ones left by a process that was killed; not one another process is writing."""
    for other in root.iterdir():
        if other == keep:
            continue
        if other.name.startswith(PARTIAL):
            newest = max((f.stat().st_mtime for f in other.iterdir()), default=other.stat().st_mtime)
            if time.time() - newest < ABANDONED_S:
                continue
        shutil.rmtree(other, ignore_errors=True)


def _key(collection: Collection, request: Request) -> dict:
    from medfed import __version__

    files = []
    for record in collection.records:
        stat = record.path.stat()
        files.append([collection.relative(record.path), record.label, record.site,
                      record.patient_id, stat.st_size, stat.st_mtime_ns])
    return {"cache": CACHE_VERSION, "medfed": __version__, "settings": vars(request) | {
        "classes": list(request.classes)}, "listing_problems": [p.file for p in collection.problems],
        "files": files}


def _why_new(root: Path, wanted: dict) -> str:
    """What differs from the cache this state directory held before, as a clause."""
    metas = sorted(root.glob(f"*/{META}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not metas:
        return " (first use of this state directory)"
    try:
        before = json.loads(metas[-1].read_text())
    except (OSError, ValueError):
        return " (the previous cache is unreadable)"
    if before.get("cache") != wanted["cache"] or before.get("medfed") != wanted["medfed"]:
        return f" (the previous cache was made by medfed {before.get('medfed')})"
    changes = [f"{name} {before['settings'].get(name)!r} → {value!r}"
               for name, value in wanted["settings"].items() if before["settings"].get(name) != value]
    old = {entry[0]: entry for entry in before.get("files", [])}
    new = {entry[0]: entry for entry in wanted["files"]}
    added = [name for name in new if name not in old]
    removed = [name for name in old if name not in new]
    changed = [name for name in new if name in old and old[name] != new[name]]
    for count, word, names in ((len(added), "added", added), (len(removed), "removed", removed),
                               (len(changed), "changed", changed)):
        if count:
            changes.append(f"{count} file(s) {word}: {few(names, shown=3)}")
    if before.get("listing_problems") != wanted["listing_problems"]:
        changes.append("the files that cannot be listed changed")
    return f" ({'; '.join(changes)})" if changes else ""


class _Pixels:
    """Decoded images written to disk one at a time. Grayscale until the first colour image
    arrives; then every image is stored as RGB, grayscale repeated (the layout
    `common.sources.load` gives a mixed collection)."""

    def __init__(self, file: Path, *, count: int, size: int) -> None:
        self.file, self.count, self.size = file, count, size
        self.writer = DiskImagesWriter(file, count=count, shape=(size, size))

    def put(self, index: int, pixels: np.ndarray) -> None:
        if pixels.ndim == 3 and len(self.writer.shape) == 2:
            self._to_rgb(upto=index)
        if pixels.ndim == 2 and len(self.writer.shape) == 3:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        self.writer.put(index, pixels)

    def _to_rgb(self, *, upto: int) -> None:
        self.writer.close()
        gray = DiskImages(self.file)
        rgb_file = self.file.with_name(f"rgb-{self.file.name}")
        rgb = DiskImagesWriter(rgb_file, count=self.count, shape=(self.size, self.size, 3))
        for index in range(upto):
            rgb.put(index, np.repeat(gray[index][:, :, None], 3, axis=2))
        del gray
        os.replace(rgb_file, self.file)
        self.writer = rgb

    def close(self) -> DiskImages:
        self.writer.close()
        return DiskImages(self.file)


def _build(collection: Collection, *, request: Request, folder: Path, meta: dict, log) -> None:
    pixels = _Pixels(folder / "decoded.npy", count=len(collection.records), size=request.image_size)
    found = decode_resized(collection, image_size=request.image_size, frame=request.frame,
                           skip_bad=request.skip_bad, keep=pixels.put, log=log)
    _skipped(found, log=log)
    decoded_images = pixels.close()
    positions = split_indices(found.labels, seed=request.seed, groups=found.patients,
                              site=request.site)
    for split in SPLITS:
        index = positions[split]
        out = DiskImagesWriter(folder / f"{split}-images.npy", count=len(index),
                               shape=decoded_images.shape[1:])
        for place, image in enumerate(index):
            out.put(place, decoded_images[int(image)])
        out.close()
        np.save(folder / f"{split}-labels.npy", found.labels[index])
    del decoded_images
    (folder / "decoded.npy").unlink()
    # Written last: its presence is what makes the folder a cache.
    (folder / META).write_text(json.dumps(meta))


def _open(folder: Path) -> dict[str, LabelledImages]:
    return {split: LabelledImages(DiskImages(folder / f"{split}-images.npy"),
                                  np.load(folder / f"{split}-labels.npy"))
            for split in SPLITS}


def _in_memory(collection: Collection, *, request: Request, log) -> dict[str, LabelledImages]:
    loaded = load(collection, image_size=request.image_size, frame=request.frame,
                  skip_bad=request.skip_bad, log=log)
    _skipped(loaded, log=log)
    positions = split_indices(loaded.labels, seed=request.seed, groups=loaded.patients,
                              site=request.site)
    return {split: loaded.images.subset(positions[split]) for split in SPLITS}


def _skipped(found: Decoded, *, log) -> None:
    if found.skipped:
        print(f"left out {len(found.skipped)} unreadable file(s) (--skip-bad): "
              f"{few([p.file for p in found.skipped], shown=3)}", file=log, flush=True)
