"""The software a result depends on, by installed version: one list for `medfed --version`, the
federated run's report.json and the comparison's model card."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("medfed", "flwr", "torch", "timm", "opacus", "torchvision", "numpy", "scikit-learn",
            "scipy", "albumentations", "pydicom", "ray")


def versions() -> dict[str, str]:
    """Package -> version from the installed metadata (nothing is imported), Python last."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return {**found, "python": platform.python_version()}
