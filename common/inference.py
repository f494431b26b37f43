"""Running a model over data: prediction and metrics, shared by sites and the server."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.device import autocast, loader_options, place_batch, place_model
from medfed.common.metrics import classification_metrics


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, class probabilities, mean cross-entropy) over a loader."""
    model.eval()
    labels, probs, loss_sum = [], [], 0.0
    for images, targets in loader:
        images, targets = place_batch(images, device), place_batch(targets, device)
        with autocast(device):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(targets.cpu().numpy())
    y = np.concatenate(labels)
    return y, np.concatenate(probs), loss_sum / max(len(y), 1)


def evaluate(model: nn.Module, data: LabelledImages, *, transform, batch_size: int,
             device: torch.device) -> dict:
    """Metrics plus mean loss of `model` on `data`."""
    loader = torch.utils.data.DataLoader(
        TransformedImages(data, transform), batch_size=batch_size * 2, shuffle=False,
        **loader_options(device),
    )
    y, probs, loss = predict(place_model(model, device), loader, device)
    return {**classification_metrics(y, probs), "loss": loss}


def evaluate_features(classifier: nn.Module, features: np.ndarray, labels: np.ndarray, *,
                      batch_size: int, device: torch.device) -> dict:
    """Metrics plus mean loss of a classifier on cached classifier inputs (common/features.py)."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(features),
                                       torch.from_numpy(labels.astype(np.int64))),
        batch_size=batch_size * 2, shuffle=False, **loader_options(device),
    )
    y, probs, loss = predict(classifier.to(device), loader, device)
    return {**classification_metrics(y, probs), "loss": loss}
