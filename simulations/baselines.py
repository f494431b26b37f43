"""The reference modes of a comparison, in plain PyTorch and scikit-learn (no Flower here):
centralized training on the pooled data, each site alone (local), and classical machine learning.

Neural modes get the federated run's recipe and budget: the same stages (the head on cached
frozen features, then the unfrozen stages), the same local epochs or steps per round, the same
learning-rate reduction and early stopping on validation loss, keeping the best-validation
model, and the same head start (class means of their own training features), so no mode wins by
training longer, starting better or choosing its model differently.
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

from medfed.common import features
from medfed.common.config import CLASS_MEANS, Config
from medfed.common.head_start import HeadStart
from medfed.common.dataset import LabelledImages
from medfed.common.inference import evaluate, evaluate_features
from medfed.common.schedule import HEAD, PlateauSchedule, Stages, selection_score
from medfed.common.training import train_head, train_local
from medfed.common.progress import Progress
from medfed.common.transforms import build_transform

CLASSICAL = ("svm-pixels", "rf-pixels", "svm-cnn", "rf-cnn")
# Side of the downsampled image whose pixels feed the classical models (the seed paper's SVM/RF
# baselines work on raw intensities).
PIXEL_SIDE = 32


def train_epochs(model: nn.Module, train: LabelledImages, val: LabelledImages, *, config: Config,
                 seed: int, device: torch.device, what: str, sites: int = 1,
                 frozen: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict]:
    """Train in place with the federated recipe and budget; leaves the best-validation weights
    loaded. Each round: the head on cached frozen features or the unfrozen stages on images, as
    the federation's stage schedule says, for `local_epochs` passes or `local_steps` x `sites`
    steps (pooled data of several sites gets the steps all of them take in one round).
    `frozen`: the train and val splits' frozen features when already computed (the sites'
    caches), else computed here once. `what` names the run in its progress lines."""
    stages = Stages.of_config(config)
    schedule = PlateauSchedule(lr=stages.start_lr(stages.of(1)), federation=config.federation)
    steps = config.train.local_steps
    budget = dataclasses.replace(config.train, local_steps=None if steps is None else steps * sites)
    head = features.classifier(model)
    cached = frozen or {}

    def frozen_features() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return cached or {name: features.site_features(model, data, config=config,
                                                       train=name == "train", cache_dir=None,
                                                       device=device)
                          for name, data in (("train", train), ("val", val))}

    center = None
    if stages.head_rounds and config.federation.head_start == CLASS_MEANS:
        cached = frozen_features()
        start = HeadStart.of_features(*cached["train"], num_classes=head.weight.shape[0])
        start.initialize(head)
        center = start.center
    best, kept = _state(model), 0
    history = []
    stage = stages.of(1)
    progress = Progress(what, total=config.federation.rounds, unit="rounds")
    for server_round in range(1, config.federation.rounds + 1):
        if stages.of(server_round) != stage:
            stage = stages.of(server_round)
            schedule.restart(stages.start_lr(stage))
        round_seed = seed * 1_009 + server_round
        if stage == HEAD:
            cached = frozen_features()
            loss = train_head(head, *cached["train"], config=budget, lr=schedule.lr,
                              proximal_mu=0.0, device=device, seed=round_seed, center=center).loss
            result = evaluate_features(head, *cached["val"], batch_size=config.train.batch_size,
                                       device=device)
        else:
            loss = train_local(model, train, config=budget, lr=schedule.lr, proximal_mu=0.0,
                               device=device, seed=round_seed,
                               transform=build_transform(model, config.data, train=True,
                                                         seed=round_seed)).loss
            result = evaluate(model, val, transform=build_transform(model, config.data, train=False),
                              batch_size=config.train.batch_size, device=device)
        score = selection_score(loss=result["loss"], auc=result["auc"],
                                criterion=config.federation.selection)
        if schedule.step(server_round, score):
            best, kept = _state(model), server_round
        history.append({"round": server_round, "stage": stage, "train_loss": loss,
                        "val_loss": result["loss"], "val_auc": result["auc"]})
        progress.advance()
        if schedule.stopped:
            break
    progress.close()
    model.load_state_dict(best)
    for entry in history:
        entry["kept"] = entry["round"] == kept
    return history


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pixel_features(data: LabelledImages) -> np.ndarray:
    """Grayscale intensities of each image downsampled to PIXEL_SIDE², scaled to [0, 1]."""
    gray = data.images if data.images.ndim == 3 else data.images.mean(axis=3).astype(np.uint8)
    small = [cv2.resize(image, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA) for image in gray]
    return np.stack(small).reshape(len(small), -1).astype(np.float32) / 255.0


def classical_model(kind: str, *, seed: int):
    """An SVM (RBF kernel, Platt-scaled probabilities) or a random forest, seeded."""
    if kind == "svm":
        # Platt scaling by cross-validation, as SVC(probability=True) did before scikit-learn 1.9.
        return make_pipeline(StandardScaler(),
                             CalibratedClassifierCV(SVC(random_state=seed), ensemble=False))
    return RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1)
