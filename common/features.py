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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.common.config import Config
from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.device import autocast, loader_options, place_batch, place_model
from medfed.common.disk_images import DiskImages
from medfed.common.files import write_bytes_atomic
from medfed.common.model import classifier_keys
from medfed.common.progress import Progress
from medfed.common.transforms import build_transform

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


class FrozenLayers:
    """The layers below one model's classifier, and their output for any split. Their weights are
    hashed once for every cache key (hashing them is most of a key's cost), not once per split."""

    def __init__(self, model: nn.Module, *, config: Config, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device

    @functools.cached_property
    def _frozen_weights(self) -> bytes:
        digest = hashlib.sha256()
        head = classifier_keys(self.model)
        for name, tensor in self.model.state_dict().items():
            if name not in head:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.digest()

    def _fingerprint(self, data: LabelledImages, *, views: int) -> str:
        """Everything the features depend on: the frozen weights, the images, the preprocessing
        and the views (with their seed)."""
        config = self.config
        digest = hashlib.sha256(f"{CACHE_VERSION}|{views}|{config.seed if views else ''}".encode())
        digest.update(repr(sorted(vars(config.data).items())).encode())
        digest.update(self._frozen_weights)
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
        config, model, device = self.config, self.model, self.device
        views = config.train.feature_views if train else 0
        labels = np.tile(data.labels, max(views, 1))
        file = None
        if cache_dir is not None:
            file = cache_dir / f"features-{self._fingerprint(data, views=views)}.npy"
            if file.is_file():
                return np.load(file), labels
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
    return FrozenLayers(model, config=config, device=device).features(data, train=train,
                                                                       cache_dir=cache_dir)
