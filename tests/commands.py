"""Running the `medfed` command as a user does, in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEDFED = str(Path(sys.executable).parent / "medfed")


def _tiny_weights() -> str:
    """A checkpoint of timm's tiny `test_efficientnet` (random weights, seeded), written once.

    medfed refuses to train a head on random frozen layers (`--weights none` with the default
    head-only recipe), so tests give the tiny model "pretrained" weights the way a user gives a
    local checkpoint: `--weights PATH`."""
    import timm
    import torch

    path = Path(tempfile.gettempdir()) / "medfed-tests" / f"test_efficientnet-{os.getuid()}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), partial)
        os.replace(partial, path)
    return str(path)


TINY_WEIGHTS = _tiny_weights()
# A tiny timm model at a small input: fast runs where the backbone does not matter.
TINY = ["--backbone", "test_efficientnet", "--weights", TINY_WEIGHTS, "--image-size", "32"]


def medfed(*args: str, data_dir: Path | None = None, cwd: Path | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDFED_OFFLINE": "1"}
    if data_dir is not None:
        env["MEDFED_DATA_DIR"] = str(data_dir)
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
