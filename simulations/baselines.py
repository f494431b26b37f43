"""The reference modes of a comparison, in plain PyTorch and scikit-learn (no Flower here):
centralized training on the pooled data, each site alone (local), and classical machine learning.

Neural modes get the federated run's budget: rounds x local epochs passes over their own training
data, with the same learning-rate reduction and early stopping on validation loss, keeping the
best-validation model, so no mode wins by training longer or by choosing its model differently.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch import nn

from medfed.common.training import train_local
from medfed.common.config import Config
from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.inference import evaluate
from medfed.common.transforms import build_transform
from medfed.common.schedule import PlateauSchedule

CLASSICAL = ("svm-pixels", "rf-pixels", "svm-cnn", "rf-cnn")
# Side of the downsampled image whose pixels feed the classical models (the seed paper's SVM/RF
# baselines work on raw intensities).
PIXEL_SIDE = 32


def train_epochs(model: nn.Module, train: LabelledImages, val: LabelledImages, *, config: Config,
                 seed: int, device: torch.device) -> list[dict]:
    """Train in place under the federated budget; leaves the best-validation weights loaded."""
    train_transform = build_transform(model, config.data, train=True, seed=seed)
    eval_transform = build_transform(model, config.data, train=False)
    schedule = PlateauSchedule(lr=config.train.lr, federation=config.federation)
    one_epoch = dataclasses.replace(config.train, local_epochs=1)
    best = _state(model)
    history = []
    for epoch in range(1, config.federation.rounds * config.train.local_epochs + 1):
        loss = train_local(model, train, transform=train_transform, config=one_epoch,
                           lr=schedule.lr, proximal_mu=0.0, device=device, seed=seed * 1_009 + epoch)
        result = evaluate(model, val, transform=eval_transform, batch_size=config.train.batch_size,
                          device=device)
        if schedule.step(epoch, result["loss"]):
            best = _state(model)
        history.append({"round": epoch, "train_loss": loss, "val_loss": result["loss"],
                        "val_auc": result["auc"]})
        if schedule.stopped:
            break
    model.load_state_dict(best)
    return history


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pixel_features(data: LabelledImages) -> np.ndarray:
    """Grayscale intensities of each image downsampled to PIXEL_SIDE², scaled to [0, 1]."""
    gray = data.images if data.images.ndim == 3 else data.images.mean(axis=3).astype(np.uint8)
    small = [cv2.resize(image, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA) for image in gray]
    return np.stack(small).reshape(len(small), -1).astype(np.float32) / 255.0


@torch.no_grad()
def cnn_features(model: nn.Module, data: LabelledImages, *, config: Config,
                 device: torch.device) -> np.ndarray:
    """Pooled penultimate features of a frozen pretrained backbone (timm's pre_logits)."""
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        TransformedImages(data, build_transform(model, config.data, train=False)),
        batch_size=config.train.batch_size * 2, shuffle=False,
    )
    chunks = [model.forward_head(model.forward_features(images.to(device)), pre_logits=True).cpu()
              for images, _ in loader]
    return torch.cat(chunks).numpy()


def classical_model(kind: str, *, seed: int):
    """An SVM (RBF kernel, Platt-scaled probabilities) or a random forest, seeded."""
    if kind == "svm":
        # Platt scaling by cross-validation, as SVC(probability=True) did before scikit-learn 1.9.
        return make_pipeline(StandardScaler(),
                             CalibratedClassifierCV(SVC(random_state=seed), ensemble=False))
    return RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1)
