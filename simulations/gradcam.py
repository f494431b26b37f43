"""Grad-CAM heat maps for any timm CNN, their overlay on the input image, and the pair (image,
overlay) a reader judges.

Clinicians ask where a model looks before they trust it; Grad-CAM answers with the last
convolutional feature map weighted by how much each channel raises the target class's logit. It
relies only on timm's contract — `forward_features` returns the last feature map and
`forward_head` turns it into logits — so it works for every backbone medfed trains, frozen or not,
without hooks on layer names.
"""

from __future__ import annotations

import cv2
import matplotlib
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Shorter side, in pixels, of each panel a reader judges: large enough to see anatomy on a screen.
DISPLAY_MIN = 224


def grad_cam(model: nn.Module, image: torch.Tensor, *, target_class: int) -> np.ndarray:
    """Heat map (H, W) float32 in [0, 1] of the evidence for `target_class` in one image.

    `image` is the normalised model input, (3, H, W) or (1, 3, H, W); the map has its spatial
    size. The model runs in eval mode and gets its training flag back; no gradient is left on
    its parameters.
    """
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    if batch.dim() != 4 or batch.shape[0] != 1:
        raise ValueError(
            f"grad_cam takes one image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
        )
    parameter = next(model.parameters(), None)
    if parameter is not None:
        batch = batch.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(batch)
        if features.dim() != 4:
            raise ValueError(
                f"Grad-CAM needs a convolutional feature map (1, C, h, w); "
                f"{type(model).__name__}.forward_features gives {tuple(features.shape)}"
            )
        # A leaf of its own: gradients reach the feature map even when the backbone is frozen,
        # and never flow into (or accumulate on) the model's parameters.
        features = features.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.forward_head(features)
            if not 0 <= target_class < logits.shape[1]:
                raise ValueError(f"target_class {target_class} outside 0..{logits.shape[1] - 1}")
            (gradients,) = torch.autograd.grad(logits[0, target_class], features)
    finally:
        model.train(was_training)

    if _channels_last(model, features):
        features, gradients = features.permute(0, 3, 1, 2), gradients.permute(0, 3, 1, 2)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    # Divide by the peak only: a map with no positive evidence stays all zero (no 0/0).
    if peak > 0:
        cam = cam / peak
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32)


def _channels_last(model: nn.Module, features: torch.Tensor) -> bool:
    """Some timm models (e.g. MambaOut) return (1, h, w, C); their width is `num_features`."""
    channels = getattr(model, "num_features", None)
    return channels is not None and features.shape[1] != channels and features.shape[3] == channels


def overlay(
    image_uint8: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """Blend a [0, 1] heat map, coloured by a matplotlib colormap, over an image.

    `image_uint8` is (H, W) grayscale or (H, W, 3) RGB; a heat map of another size is resized
    (bilinear) to the image. Returns (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image_uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay takes an (H, W) or (H, W, 3) image, got {image_uint8.shape}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"overlay takes an (h, w) heat map, got {heat.shape}")
    height, width = image.shape[:2]
    if heat.shape != (height, width):
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    colours = matplotlib.colormaps[colormap](np.clip(heat, 0, 1))[..., :3] * 255
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def side_by_side(image_uint8: np.ndarray, heatmap: np.ndarray, *, minimum: int = DISPLAY_MIN,
                 gap: int = 8) -> np.ndarray:
    """The image as it was decoded and its Grad-CAM overlay side by side, each panel at least
    `minimum` pixels on its shorter side; (H, 2W + gap, 3) uint8 RGB on a white background.

    The image is enlarged by a whole factor with nearest-neighbour, so each decoded pixel is
    shown as a block of equal pixels and no smoothing invents or hides detail. The heat map is
    enlarged bilinearly (in `overlay`): it comes from a feature grid a few cells wide, and hard
    cell edges would suggest a sharpness Grad-CAM does not have.
    """
    image = np.asarray(image_uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    factor = max(1, -(-minimum // min(image.shape[:2])))
    enlarged = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    height, width = enlarged.shape[:2]
    panel = np.full((height, 2 * width + gap, 3), 255, dtype=np.uint8)
    panel[:, :width] = enlarged
    panel[:, width + gap:] = overlay(enlarged, heatmap)
    return panel
