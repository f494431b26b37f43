"""Image preprocessing derived from the backbone's own data config, so it cannot disagree with
the weights: timm's mean/std, the configured input size, and albumentations augmentation at
training time only. Random ranges live inside the transforms (drawn per image, never pre-drawn).
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from timm.data import resolve_model_data_config
from torch import nn


def build_transform(model: nn.Module, *, image_size: int, train: bool, seed: int | None = None):
    data_config = resolve_model_data_config(model)
    steps = [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR)]
    if train:
        steps += [
            A.Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                     border_mode=cv2.BORDER_CONSTANT, p=0.7),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    steps += [
        A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0),
        ToTensorV2(),
    ]
    return A.Compose(steps, seed=seed)
