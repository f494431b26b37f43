"""Writing result files so that a file that exists is complete: write a sibling, then rename.

An interrupted run or a full disk then leaves no half-written report that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medfed.common.errors import MedfedError, few


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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a hidden sibling, flush it to disk, then rename it over `path`: `path` is
    either its previous content or the new one, never a half-written file. On failure (a full
    disk: ENOSPC) the sibling is removed and OSError propagates; the caller words it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_torch(path: str | Path, obj) -> None:
    """torch.save, atomically, with a full disk reported as one line (MedfedError) and no
    partial file left; see write_bytes_atomic."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        write_bytes_atomic(path, buffer.getbuffer())
    except OSError as exc:
        raise MedfedError(f"cannot write {path}: {exc.strerror or exc}") from None


def claim_run_dir(out: Path, *, option: str = "--out") -> Path:
    """Check `out` can become a finished run directory and create its staging sibling
    `<out>.incomplete`, which is returned. Refused with one line, before any work: `out` is a file,
    a non-empty folder, or under a file; the staging folder cannot be created; or it already
    holds something (an earlier unfinished run, or anything else): that is never deleted."""
    staging = out.with_name(out.name + ".incomplete")
    if out.exists() and not out.is_dir():
        raise MedfedError(f"{option} {out} is an existing file; give a folder that does not exist yet")
    if out.is_dir() and any(out.iterdir()):
        raise MedfedError(f"output directory {out} already exists and is not empty; choose another {option}")
    if staging.exists() and not staging.is_dir():
        raise MedfedError(f"{staging} (where {option} {out} is written until it is finished) is an "
                          f"existing file; move it away or choose another {option}")
    if staging.is_dir():
        entries = sorted(p.name for p in staging.iterdir())
        if entries:
            raise MedfedError(
                f"{staging} already holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                f"({few(entries, shown=3)}), most likely an earlier unfinished run with this "
                f"{option}; medfed does not resume it and will not delete it: look at it, remove "
                f"it yourself, or choose another {option}"
            )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise MedfedError(f"{option} {out} cannot be created: {blocking} is a file, not a folder; "
                          f"choose another {option}")
    created = not staging.exists()
    try:
        staging.mkdir(parents=True, exist_ok=True)
        probe = staging / ".medfed-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if created:
            try:
                staging.rmdir()  # the empty folder made just now; nothing of the user's
            except OSError:
                pass
        raise MedfedError(f"cannot write the run directory {staging} ({exc.strerror or exc}); "
                          f"choose another {option}") from None
    return staging
