"""The server's checkpoint: written atomically after every round, read by `--resume`.

It holds what a resumed run needs to continue exactly as an uninterrupted one would: the round
reached, the global arrays, the strategy's state (round records, best arrays, plateau schedule,
FedAdam/FedYogi moments) and the server's random state. The config is stored too, so a resume
with a different config is refused instead of silently mixing two studies; only the number of
rounds may grow (continuing a finished run for more rounds).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from medfed.common.errors import MedfedError
from medfed.common.files import write_bytes_atomic

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, *, server_round: int, arrays: dict[str, np.ndarray],
                    strategy_state: dict, config_json: str) -> None:
    """Serialized in memory first, then written beside the checkpoint, flushed and renamed over
    it (common.files.write_bytes_atomic): a crash or a full disk mid-write leaves the previous
    checkpoint as it was and no `.partial` file. torch.save is not given the file itself: its
    C++ writer reports a full disk as a RuntimeError with pages of context, not as ENOSPC."""
    path = Path(run_dir) / CHECKPOINT
    buffer = io.BytesIO()
    torch.save({
        "round": server_round, "arrays": arrays, "strategy": strategy_state, "config": config_json,
        "random": random.getstate(), "numpy_random": np.random.get_state(),
        "torch_random": torch.get_rng_state(),
    }, buffer)
    try:
        write_bytes_atomic(path, buffer.getbuffer())
    except OSError as exc:
        kept = ("the previous round's checkpoint there is kept unchanged (`medfed server start "
                "--resume` continues from it)" if path.is_file() else "no earlier checkpoint exists")
        raise MedfedError(
            f"cannot write the round-{server_round} checkpoint {path} ({exc.strerror or exc}); "
            f"{kept}; the run stopped: free some space and start again"
        ) from None


def load_checkpoint(run_dir: Path, *, config_json: str) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise MedfedError(f"cannot resume: {path} does not exist (no round of that run finished)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a damaged file
        raise MedfedError(f"cannot resume: {path} is unreadable ({exc})") from None
    if _without_rounds(state["config"]) != _without_rounds(config_json):
        raise MedfedError(f"cannot resume: {path} belongs to a run with another config; resume with "
                          f"the run's own config.yaml")
    random.setstate(state["random"])
    np.random.set_state(state["numpy_random"])
    torch.set_rng_state(state["torch_random"])
    return state


def _without_rounds(config_json: str) -> dict:
    config = json.loads(config_json)
    config["federation"].pop("rounds")
    return config
