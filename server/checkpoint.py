"""The server's checkpoint: written atomically after every round, read by `--resume`.

It holds what a resumed run needs to continue exactly as an uninterrupted one would: the round
reached, the global arrays, the strategy's state (round records, best arrays, plateau schedule,
FedAdam/FedYogi moments) and the server's random state. The config is stored too, so a resume
with a different config is refused instead of silently mixing two studies; only the number of
rounds may grow (continuing a finished run for more rounds).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from medfed.common.errors import MedfedError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, *, server_round: int, arrays: dict[str, np.ndarray],
                    strategy_state: dict, config_json: str) -> None:
    path = run_dir / CHECKPOINT
    partial = path.with_name(f".{CHECKPOINT}.partial")
    torch.save({
        "round": server_round, "arrays": arrays, "strategy": strategy_state, "config": config_json,
        "random": random.getstate(), "numpy_random": np.random.get_state(),
        "torch_random": torch.get_rng_state(),
    }, partial)
    # A crash mid-write leaves the previous checkpoint intact: the rename is atomic.
    os.replace(partial, path)


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
