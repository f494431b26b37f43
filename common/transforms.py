"""Image preprocessing derived from the backbone's own data config, so it cannot disagree with
the weights: timm's mean/std, the configured input size, optional histogram equalization, and
albumentations augmentation at training time only. Random ranges live inside the transforms
(drawn per image, never pre-drawn).
"""

from __future__ import annotations

import cv2
from torch import nn

from medfed.common.config import DataConfig


def build_transform(model: nn.Module, data: DataConfig, *, train: bool, seed: int | None = None):
    """The one preprocessing path of training and evaluation; `train` adds augmentation."""
    # Imported here: timm (with the torchvision it loads) and albumentations take 3 s to import,
    # and a site's messages on cached features need no transform.
    import albumentations as A
    from albumentations.pytorch import ToTensorV2
    from timm.data import resolve_model_data_config

    data_config = resolve_model_data_config(model)
    size = data.image_size
    steps = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    # Equalization is part of preprocessing, not augmentation: it runs the same at every split,
    # so a model never sees an equalized training image and a raw test image.
    if data.equalize == "clahe":
        steps.append(A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=1.0))
    elif data.equalize == "hist":
        steps.append(A.Equalize(p=1.0))
    if train and data.augment:
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
