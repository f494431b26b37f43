"""Frozen features computed once: what the classifier sees for every image of a site.

While only the classifier trains (the head stage), everything before it is a fixed function of
the image, so its output is computed once per site and run and the classifier trains on it:
`classifier(features)` equals the full forward pass in evaluation mode (timm's head dropout, off
in evaluation, is not applied). With `train.feature_views = K > 0` each training image
contributes K augmented views, drawn once with fixed seeds; with 0, the plain image.

The features are cached as .npy files in a folder of the site's own (simulation: beside the
virtual sites' data; deployment: the site's state directory), named by a hash of everything they
depend on, so a restarted process reuses them and a changed setting never reads stale ones. They
never leave the site.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.common.config import Config
from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.device import autocast, loader_options, place_batch, place_model
from medfed.common.disk_images import DiskImages
from medfed.common.files import write_bytes_atomic
from medfed.common.model import OFFLINE_IMAGENET
from medfed.common.progress import Progress
from medfed.common.transforms import build_transform
from medfed.common.wire import classifier_keys

CACHE_VERSION = 1


def classifier(model: nn.Module) -> nn.Module:
    return model.get_classifier()


@torch.no_grad()
def classifier_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's input for a batch, captured from a real forward pass in evaluation mode
    (so it is right for any timm model, whatever its pooling or pre-logits layers do)."""
    captured = []
    hook = classifier(model).register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        model.eval()(images)
    finally:
        hook.remove()
    return captured[0].flatten(1)


# A CPU computes frozen features no slower in batches of 8 than of 32, with a quarter of the
# activations resident: a site's first message at 224 px, 1,000 images, took 22 s and peaked at
# 1.16 GB against 36 s and 1.74 GB (docs/BENCHMARKS.md). A GPU takes the training batch.
CPU_FEATURE_BATCH = 8


def compute(model: nn.Module, data: LabelledImages, *, transform, batch_size: int,
            device: torch.device) -> np.ndarray:
    """The classifier's inputs for every image of `data`, in order."""
    batch_size = batch_size if device.type == "cuda" else min(batch_size, CPU_FEATURE_BATCH)
    loader = torch.utils.data.DataLoader(TransformedImages(data, transform),
                                         batch_size=batch_size, shuffle=False,
                                         **loader_options(device))
    place_model(model, device)
    # Filled in place: collecting the batches and joining them would hold the features three
    # times over at the end (100 MB each at 20,000 images).
    out, done = None, 0
    with Progress("frozen features", total=len(data)) as progress:
        for images, _ in loader:
            with autocast(device):
                batch = classifier_inputs(model, place_batch(images, device)).float().cpu().numpy()
            if out is None:
                out = np.empty((len(data), batch.shape[1]), dtype=np.float32)
            out[done:done + len(batch)] = batch
            done += len(batch)
            progress.advance(len(images))
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def weights_source(config: Config) -> str:
    """What the frozen weights are built from, known without building them: the model settings
    and seed, timm's and torch's versions, the offline ImageNet package's version, or a
    checkpoint file's size and modification time."""
    model = config.model
    parts = [repr(sorted(vars(model).items())), str(config.seed), version("timm"), version("torch")]
    if model.weights == "imagenet" and model.backbone in OFFLINE_IMAGENET:
        parts.append(version(OFFLINE_IMAGENET[model.backbone][0]))
    elif model.weights not in ("imagenet", "none"):
        path = Path(model.weights).expanduser()
        try:
            status = path.stat()
            parts += [str(path.resolve()), str(status.st_size), str(status.st_mtime_ns)]
        except OSError:
            parts.append(f"unreadable {path}")  # never matches a memo; building the model says why
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class FrozenLayers:
    """The layers below one model's classifier, and their output for any split.

    The model is built (`build`) only when features must be computed. A cache key holds the hash
    of the frozen weights themselves; that hash is remembered beside the cache under what the
    weights are built from (`weights_source`), so a site's later messages find their features
    without importing timm or building the model (about 3 s of a message on 2 cores)."""

    def __init__(self, build: Callable[[], nn.Module], *, config: Config,
                 device: torch.device) -> None:
        self._build, self.config, self.device = build, config, device
        self._digest: bytes | None = None

    @functools.cached_property
    def model(self) -> nn.Module:
        return self._build()

    def _frozen_weights(self, cache_dir: Path | None) -> bytes:
        if self._digest is not None:
            return self._digest
        memo = None
        if cache_dir is not None:
            memo = cache_dir / f"weights-{weights_source(self.config)}.sha256"
        if memo is not None and memo.is_file():
            self._digest = bytes.fromhex(memo.read_text().strip())
            return self._digest
        digest = hashlib.sha256()
        head = classifier_keys(self.model)
        for name, tensor in self.model.state_dict().items():
            if name not in head:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._digest = digest.digest()
        if memo is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(memo, self._digest.hex().encode())
        return self._digest

    def _fingerprint(self, data: LabelledImages, *, views: int, cache_dir: Path | None) -> str:
        """Everything the features depend on: the frozen weights, the images, the preprocessing
        and the views (with their seed)."""
        config = self.config
        digest = hashlib.sha256(f"{CACHE_VERSION}|{views}|{config.seed if views else ''}".encode())
        digest.update(repr(sorted(vars(config.data).items())).encode())
        digest.update(self._frozen_weights(cache_dir))
        if isinstance(data.images, DiskImages):
            # A site's decoded-image cache: named by its file, not read again at every message.
            digest.update(data.images.identity)
        else:
            digest.update(np.ascontiguousarray(data.images).tobytes())
        return digest.hexdigest()[:24]

    def features(self, data: LabelledImages, *, train: bool,
                 cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split: the training split with its augmented views when
        `train` and `train.feature_views` > 0, read from `cache_dir` when computed before."""
        config, device = self.config, self.device
        views = config.train.feature_views if train else 0
        labels = np.tile(data.labels, max(views, 1))
        file = None
        if cache_dir is not None:
            fingerprint = self._fingerprint(data, views=views, cache_dir=cache_dir)
            file = cache_dir / f"features-{fingerprint}.npy"
            if file.is_file():
                return np.load(file), labels
        model = self.model
        if views == 0:
            values = compute(model, data, transform=build_transform(model, config.data, train=False),
                             batch_size=config.train.batch_size, device=device)
        else:
            values = np.concatenate([
                compute(model, data, batch_size=config.train.batch_size, device=device,
                        transform=build_transform(model, config.data, train=True,
                                                  seed=config.seed * 1_009 + view))
                for view in range(views)
            ])
        if file is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, values)
            write_bytes_atomic(file, buffer.getvalue())
        return values, labels


def site_features(model: nn.Module, data: LabelledImages, *, config: Config, train: bool,
                  cache_dir: Path | None, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """One split's features, for a caller that needs a single split."""
    return FrozenLayers(lambda: model, config=config, device=device).features(data, train=train,
                                                                       cache_dir=cache_dir)
