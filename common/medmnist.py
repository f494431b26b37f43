"""Finding MedMNIST files: the data directory, the official download and its MD5 check."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import platformdirs

from medfed.common.errors import MedfedError
from medfed.common.medmnist_catalogue import DATASETS, RECORD_URL

ENV_DATA_DIR = "MEDFED_DATA_DIR"
# Set to 1 on air-gapped machines: a missing file is then an error, never a download attempt.
ENV_OFFLINE = "MEDFED_OFFLINE"


def data_dir(explicit: str | None) -> Path:
    """`--data-dir`, else $MEDFED_DATA_DIR, else the user cache directory."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    return Path(platformdirs.user_cache_dir("medfed")) / "medmnist"


def file_name(dataset: str, resolution: int) -> str:
    return f"{dataset}.npz" if resolution == 28 else f"{dataset}_{resolution}.npz"


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate(dataset: str, resolution: int, directory: Path, *, download: bool = True) -> Path:
    """Return the local path of a MedMNIST file, downloading and MD5-checking it when missing."""
    name = file_name(dataset, resolution)
    path = directory / name
    if path.is_file():
        return path
    url = f"{RECORD_URL}/{name}?download=1"
    if not download or os.environ.get(ENV_OFFLINE) == "1":
        raise MedfedError(
            f"{path} is missing; download {url} and put it there "
            f"(or point --data-dir / ${ENV_DATA_DIR} at a folder that has it)"
        )
    _download(url, path, expected_md5=DATASETS[dataset]["md5"][resolution])
    return path


def _download(url: str, path: Path, *, expected_md5: str) -> None:
    """Download to a temporary file and move it in place only once its MD5 is right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                shutil.copyfileobj(response, tmp)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            tmp_path.unlink(missing_ok=True)
            raise MedfedError(
                f"{path} is missing and could not be downloaded ({exc}); without network, "
                f"download {url} elsewhere and put it at {path} "
                f"(or point --data-dir / ${ENV_DATA_DIR} at a folder that has it)"
            ) from None
    actual = md5sum(tmp_path)
    if actual != expected_md5:
        tmp_path.unlink(missing_ok=True)
        raise MedfedError(
            f"downloaded {url} has MD5 {actual}, expected {expected_md5}; try again later"
        )
    tmp_path.replace(path)
