"""Plain PyTorch local training for one round at one site (no Flower in here).

`train_local` trains the unfrozen layers on images; `train_head` trains the classifier alone on
cached frozen features (common/features.py). Both run the same optimization loop, so a round's
budget (`local_epochs` passes or `local_steps` steps), the optimizer, FedProx's proximal term and
DP-SGD (common/privacy.py) mean the same thing in both stages.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medfed.common.config import TrainConfig
from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.device import (
    autocast, loader_options, needs_loss_scaling, place_batch, place_model,
)
from medfed.common.head_start import centered
from medfed.common.privacy import SitePlan, make_private


@dataclass
class Trained:
    """One round of local training: the mean cross-entropy seen, and with DP-SGD the releases
    Opacus' accountant recorded, (noise multiplier, sample rate, steps)."""

    loss: float
    releases: list[tuple[float, float, int]] = field(default_factory=list)


def make_optimizer(params, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


def train_local(
    model: nn.Module,
    data: LabelledImages,
    *,
    transform,
    config: TrainConfig,
    lr: float,
    proximal_mu: float,
    device: torch.device,
    seed: int,
    private: SitePlan | None = None,
) -> Trained:
    """Train the unfrozen layers in place for one round (with DP-SGD under `private`).

    With `proximal_mu > 0` (FedProx) the loss gains mu/2 * ||w - w_global||^2 over the trainable
    weights, w_global being the weights received this round.
    """
    place_model(model, device).train()
    dataset = TransformedImages(data, transform)
    return _optimize(model, dataset, config=config, lr=lr, proximal_mu=proximal_mu, device=device,
                     seed=seed, private=private)


def train_head(
    classifier: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    config: TrainConfig,
    lr: float,
    proximal_mu: float,
    device: torch.device,
    seed: int,
    private: SitePlan | None = None,
    center: np.ndarray | None = None,
) -> Trained:
    """Train the classifier alone in place on cached classifier inputs; with `center`, in
    centered coordinates (common/head_start.py), the classifier left in raw ones."""
    classifier.to(device).train()
    if center is not None:
        features = features - center.astype(features.dtype)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(features),
                                             torch.from_numpy(labels.astype(np.int64)))
    with centered(classifier, center):
        return _optimize(classifier, dataset, config=config, lr=lr, proximal_mu=proximal_mu,
                         device=device, seed=seed, private=private)


def _optimize(module: nn.Module, dataset, *, config: TrainConfig, lr: float, proximal_mu: float,
              device: torch.device, seed: int, private: SitePlan | None) -> Trained:
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = make_optimizer(params, config, lr)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
        drop_last=len(dataset) > config.batch_size and private is None, **loader_options(device),
    )
    engine = None
    # The global generator is restored afterwards: DP-SGD's reseeding stays inside this round.
    with torch.random.fork_rng(devices=[], enabled=private is not None):
        if private is not None:
            # DP-SGD's noise and Poisson sampling must not be reproducible from the run's seed,
            # which the server knows: they draw from the operating system's randomness.
            torch.manual_seed(secrets.randbits(63))
            module, optimizer, loader, engine = make_private(
                module, optimizer, loader, plan=private,
                generator=torch.Generator(device=device).manual_seed(secrets.randbits(63)))
        # Opacus' per-sample gradients are computed in full precision.
        amp = private is None
        scaler = torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(device, enabled=amp))
        loss_sum, seen = 0.0, 0
        for inputs, targets in _batches(loader, config):
            inputs, targets = place_batch(inputs, device), place_batch(targets, device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, enabled=amp):
                # The mean, written so that an empty batch (Poisson sampling draws them; its noisy
                # step still counts) gives 0, not NaN.
                cross_entropy = nn.functional.cross_entropy(module(inputs).float(), targets,
                                                            reduction="sum") / max(len(targets), 1)
            loss = cross_entropy
            if anchor is not None:
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                loss = loss + proximal_mu / 2 * proximal
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += cross_entropy.item() * len(targets)
            seen += len(targets)
    releases = []
    if engine is not None:
        releases = [tuple(entry) for entry in engine.accountant.history]
        module._close()  # Opacus' hooks off the caller's module, which may train again
    return Trained(loss=loss_sum / max(seen, 1), releases=releases)


def _batches(loader, config: TrainConfig):
    """`local_steps` batches, reshuffling after each pass, or `local_epochs` whole passes."""
    if config.local_steps is None:
        return itertools.chain.from_iterable(loader for _ in range(config.local_epochs))
    passes = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
    return itertools.islice(passes, config.local_steps)
