"""Plain PyTorch local training for one round at one site (no Flower in here).

`train_local` trains the unfrozen layers on images; `train_head` trains the classifier alone on
cached frozen features (common/features.py). Both run the same optimization loop, so a round's
budget (`local_epochs` passes or `local_steps` steps), the optimizer and FedProx's proximal term
mean the same thing in both stages.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from medfed.common.config import TrainConfig
from medfed.common.dataset import LabelledImages, TransformedImages


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
) -> float:
    """Train the unfrozen layers in place for one round; return the mean cross-entropy seen.

    With `proximal_mu > 0` (FedProx) the loss gains mu/2 * ||w - w_global||^2 over the trainable
    weights, w_global being the weights received this round.
    """
    model.to(device).train()
    dataset = TransformedImages(data, transform)
    return _optimize(model, dataset, config=config, lr=lr, proximal_mu=proximal_mu, device=device,
                     seed=seed)


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
) -> float:
    """Train the classifier alone in place on cached classifier inputs; the mean cross-entropy."""
    classifier.to(device).train()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(features),
                                             torch.from_numpy(labels.astype(np.int64)))
    return _optimize(classifier, dataset, config=config, lr=lr, proximal_mu=proximal_mu,
                     device=device, seed=seed)


def _optimize(module: nn.Module, dataset, *, config: TrainConfig, lr: float, proximal_mu: float,
              device: torch.device, seed: int) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = make_optimizer(params, config, lr)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
        drop_last=len(dataset) > config.batch_size,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_sum, seen = 0.0, 0
    for inputs, targets in _batches(loader, config):
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            cross_entropy = nn.functional.cross_entropy(module(inputs).float(), targets)
        loss = cross_entropy
        if anchor is not None:
            proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            loss = loss + proximal_mu / 2 * proximal
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += cross_entropy.item() * len(targets)
        seen += len(targets)
    return loss_sum / max(seen, 1)


def _batches(loader, config: TrainConfig):
    """`local_steps` batches, reshuffling after each pass, or `local_epochs` whole passes."""
    if config.local_steps is None:
        return itertools.chain.from_iterable(loader for _ in range(config.local_epochs))
    passes = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
    return itertools.islice(passes, config.local_steps)
