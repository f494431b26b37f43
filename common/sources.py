"""A hospital's images as they come: a folder with one subfolder per class, or a CSV manifest.

Listing (`discover`) finds every file and label and records what is wrong without decoding
anything; decoding (`decoded`) turns each file into display-ready pixels through
`common.imaging`, one file at a time so a data check over a large archive stays in constant
memory; `load` keeps the pixels, resized to the model input, as `LabelledImages` with each
image's site and patient. Every problem is kept with its file name, never dropped silently: the
caller either refuses with the list or, when asked to (`--skip-bad`), leaves those files out and
says how many.

Manifest columns: `path` and `label` (required), `site` and `patient_id` (optional). Paths are
relative to the manifest. Without a patient_id column, a DICOM file's PatientID is used.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from medfed.common.dataset import LabelledImages
from medfed.common.decoded_image import DecodedImage, ImageReadError
from medfed.common.errors import MedfedError
from medfed.common.imaging import IMAGE_SUFFIXES, is_dicom, read_image
from medfed.common.progress import tracked

MANIFEST_SUFFIXES = (".csv",)
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("site", "patient_id")
# Problems listed in an error message; the data check lists all of them.
SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: str
    site: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str


@dataclass
class Collection:
    """Everything listed under one folder or manifest, before any file is decoded."""

    root: Path
    kind: str  # "folder" or "manifest"
    classes: list[str]
    records: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    # Files in a class folder that are not images (a README, a .DS_Store): left out, but shown.
    ignored: list[str] = field(default_factory=list)

    def relative(self, path: Path) -> str:
        base = self.root if self.kind == "folder" else self.root.parent
        try:
            return str(path.relative_to(base))
        except ValueError:
            return str(path)


@dataclass
class Decoded:
    """What decoding found besides the pixels: each readable image's label, site and patient."""

    labels: np.ndarray
    classes: list[str]
    sites: np.ndarray | None
    # Patient of each image; None when no image has one (then every image is its own patient).
    patients: np.ndarray | None
    skipped: list[Problem]


@dataclass
class Loaded(Decoded):
    """Decoded images resized to the model input, with where each came from."""

    images: LabelledImages


def is_collection(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES


def discover(path: str | Path, *, classes: list[str] | None = None) -> Collection:
    """List a folder or manifest; `classes` (an agreed class list) makes other labels a problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MedfedError(f"{path} does not exist; give a folder with one subfolder per class "
                          f"or a CSV manifest with path,label columns")
    collection = _discover_folder(path) if path.is_dir() else _discover_manifest(path)
    if classes is not None:
        unknown = [c for c in collection.classes if c not in classes]
        for label in unknown:
            collection.problems += [
                Problem(collection.relative(r.path), f"label '{label}' is not one of the classes "
                                                     f"{', '.join(classes)}")
                for r in collection.records if r.label == label
            ]
        collection.records = [r for r in collection.records if r.label in classes]
        collection.classes = list(classes)
    return collection


def _discover_folder(root: Path) -> Collection:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise MedfedError(
            f"{root} has no subfolders; put each class's images in a subfolder named after the "
            f"class (e.g. {root}/normal/, {root}/pneumonia/) or give a CSV manifest"
        )
    collection = Collection(root=root, kind="folder", classes=[d.name for d in class_dirs], records=[])
    for class_dir in class_dirs:
        found = 0
        for file in sorted(class_dir.rglob("*")):
            if not file.is_file() or any(part.startswith(".") for part in file.relative_to(root).parts):
                continue
            if file.suffix.lower() in IMAGE_SUFFIXES or (not file.suffix and is_dicom(file)):
                collection.records.append(ImageRecord(file, class_dir.name))
                found += 1
            else:
                collection.ignored.append(str(file.relative_to(root)))
        if not found:
            collection.problems.append(Problem(
                class_dir.name + "/", f"class folder is empty (no {', '.join(IMAGE_SUFFIXES)} files)"))
    return collection


def _discover_manifest(manifest: Path) -> Collection:
    if manifest.suffix.lower() not in MANIFEST_SUFFIXES:
        raise MedfedError(f"{manifest} is neither a folder nor a .csv manifest")
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedfedError(f"cannot read manifest {manifest}: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MedfedError(
            f"manifest {manifest} lacks column(s) {', '.join(missing)}; its header must name "
            f"path,label and optionally site,patient_id (found: {', '.join(columns) or 'nothing'})"
        )
    if not rows:
        raise MedfedError(f"manifest {manifest} has a header but no rows")
    collection = Collection(root=manifest, kind="manifest", classes=[], records=[])
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest.name} line {number}"
        empty = [c for c in REQUIRED_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in columns)
                 if not row.get(c)]
        if empty:
            collection.problems.append(Problem(where, f"empty {', '.join(empty)}"))
            continue
        file = (manifest.parent / row["path"]).resolve()
        if not file.is_file():
            collection.problems.append(Problem(row["path"], f"file not found ({where})"))
            continue
        collection.records.append(ImageRecord(file, row["label"], site=row.get("site"),
                                              patient_id=row.get("patient_id")))
    collection.classes = sorted({r.label for r in collection.records})
    return collection


def decoded(collection: Collection, *, frame: int | None = None
            ) -> Iterator[tuple[ImageRecord, DecodedImage | Problem]]:
    """Each listed file with its pixels, or the problem that stops it being read."""
    for record in collection.records:
        try:
            # A frame number means something only for multi-frame DICOM, never for a PNG beside it.
            yield record, read_image(record.path, frame=frame if is_dicom(record.path) else None)
        except ImageReadError as exc:
            yield record, Problem(collection.relative(record.path), str(exc))


def refuse(problems: list[Problem], *, source: Path) -> MedfedError:
    """The error for data with problems: the first few files and what to do."""
    shown = "\n".join(f"  {p.file}: {p.reason}" for p in problems[:SHOWN_PROBLEMS])
    more = f"\n  … and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return MedfedError(
        f"{len(problems)} problem(s) in {source}:\n{shown}{more}\n"
        f"Run `medfed data check {source}` for the full list; fix or remove those files, "
        f"or pass --skip-bad to leave them out"
    )


def decode_resized(collection: Collection, *, image_size: int, keep: Callable[[int, np.ndarray], None],
                   frame: int | None = None, skip_bad: bool = False, log=None) -> Decoded:
    """Decode every file, resize it to `image_size` square and hand it to `keep(index, pixels)`
    (index: its place among the readable images), one at a time; or refuse with the problems."""
    labels, sites, patients = [], [], []
    problems = list(collection.problems)
    images = tracked(decoded(collection, frame=frame), what=f"decoding {collection.root.name}",
                     total=len(collection.records), stream=log)
    for record, result in images:
        if isinstance(result, Problem):
            problems.append(result)
            continue
        keep(len(labels), cv2.resize(result.pixels, (image_size, image_size),
                                     interpolation=cv2.INTER_AREA))
        labels.append(collection.classes.index(record.label))
        sites.append(record.site)
        patients.append(record.patient_id or result.info.get("patient_id"))
    if problems and not skip_bad:
        raise refuse(problems, source=collection.root)
    if not labels:
        raise MedfedError(f"{collection.root} has no readable images")
    known_patients = any(p is not None for p in patients)
    return Decoded(
        labels=np.asarray(labels, dtype=np.int64),
        classes=list(collection.classes),
        sites=np.asarray(sites, dtype=object) if collection.kind == "manifest" and all(sites) else None,
        # An image without a patient id is its own patient: it cannot leak into another's split.
        patients=np.asarray([p if p is not None else f"image:{i}" for i, p in enumerate(patients)],
                            dtype=object) if known_patients else None,
        skipped=problems,
    )


def load(collection: Collection, *, image_size: int, frame: int | None = None,
         skip_bad: bool = False, log=None) -> Loaded:
    """Decode every file and resize it to `image_size` square, in memory, or refuse with the
    problems."""
    pixels = []
    found = decode_resized(collection, image_size=image_size, frame=frame, skip_bad=skip_bad,
                            keep=lambda index, image: pixels.append(image), log=log)
    # One channel layout for the whole collection: RGB (ultrasound, photographs) wins, and
    # grayscale images are repeated to 3 channels next to it.
    if any(p.ndim == 3 for p in pixels):
        pixels = [p if p.ndim == 3 else np.repeat(p[:, :, None], 3, axis=2) for p in pixels]
    return Loaded(**vars(found), images=LabelledImages(np.stack(pixels), found.labels))
