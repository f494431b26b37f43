"""Plain PyTorch local training for one round at one site (no Flower in here)."""

from __future__ import annotations

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
    """Train in place for `config.local_epochs`; return the mean cross-entropy seen.

    With `proximal_mu > 0` (FedProx) the loss gains mu/2 * ||w - w_global||^2 over the trainable
    weights, w_global being the weights received this round.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = make_optimizer(params, config, lr)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        TransformedImages(data, transform), batch_size=config.batch_size, shuffle=True,
        generator=generator, drop_last=len(data) > config.batch_size,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_sum, seen = 0.0, 0
    for _ in range(config.local_epochs):
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                cross_entropy = nn.functional.cross_entropy(model(images).float(), targets)
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
