"""Running the `medfed` command as a user does, in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MEDFED = str(Path(sys.executable).parent / "medfed")
# A tiny timm model at a small input: fast runs where the backbone does not matter.
TINY = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32"]


def medfed(*args: str, data_dir: Path | None = None, cwd: Path | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDFED_OFFLINE": "1"}
    if data_dir is not None:
        env["MEDFED_DATA_DIR"] = str(data_dir)
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
