"""medfed: federated fine-tuning of ImageNet-pretrained CNNs for medical imaging, on Flower.

This folder is only the root of the `medfed` package (pyproject.toml maps it here); the code
lives in the subpackages cli/, common/, server/, client/ and simulations/, which pyproject maps
to `medfed.cli`, `medfed.common`, .... It keeps imports light: nothing is imported here.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # The version is pyproject's, read from the installed package's metadata when asked for.
    if name == "__version__":
        from importlib.metadata import version

        return version("medfed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
