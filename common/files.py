"""Writing result files so that a file that exists is complete: write a sibling, then rename.

An interrupted run or a full disk then leaves no half-written report that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medfed.common.errors import MedfedError


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise MedfedError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_json(path: str | Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
