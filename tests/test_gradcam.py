"""Grad-CAM on timm backbones: shape, range, side effects, and whether it points at the evidence."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from medfed.simulations.gradcam import grad_cam, overlay, side_by_side
from medfed.common.model import freeze_stages


def _model(name: str = "test_efficientnet", num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _image(height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(1))


class BrightDarkDetector(nn.Module):
    """Hand-made model on timm's contract: channel 0 of the feature map fires on bright pixels,
    channel 1 on dark ones (pooled 4x4, so the map is smaller than the image); class 1's logit
    reads only the bright channel, class 0's only the dark one."""

    def __init__(self):
        super().__init__()
        self.detect = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.detect.weight.copy_(torch.tensor([[1.0] * 3, [-1.0] * 3]).view(2, 3, 1, 1) / 3)
            self.head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

    def forward_features(self, x):
        return F.avg_pool2d(F.relu(self.detect(x)), 4)

    def forward_head(self, features):
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class ChannelsLastDetector(BrightDarkDetector):
    """The same model with a (1, h, w, C) feature map, as timm's MambaOut returns."""

    num_features = 2

    def forward_features(self, x):
        return super().forward_features(x).permute(0, 2, 3, 1)

    def forward_head(self, features):
        return super().forward_head(features.permute(0, 3, 1, 2))


def _bright_and_dark_squares() -> torch.Tensor:
    image = torch.zeros(3, 32, 48)
    image[:, 4:12, 4:12] = 1.0  # bright square, top left
    image[:, 20:28, 36:44] = -1.0  # dark square, bottom right
    return image


def test_map_has_input_size_and_unit_range():
    model = _model()
    for image in (_image(), _image().unsqueeze(0)):
        cam = grad_cam(model, image, target_class=0)
        assert cam.shape == (64, 96)
        assert cam.dtype == np.float32
        assert np.isfinite(cam).all()
        assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)


def test_map_depends_on_target_class():
    model = _model()
    maps = [grad_cam(model, _image(), target_class=c) for c in range(3)]
    assert not np.allclose(maps[0], maps[1])
    assert not np.allclose(maps[1], maps[2])


def test_leaves_no_gradients_and_restores_training_flag():
    model = _model()
    for training in (True, False):
        model.train(training)
        grad_cam(model, _image(), target_class=1)
        assert model.training is training
        assert all(p.grad is None for p in model.parameters())


def test_works_with_a_frozen_backbone():
    model = _model()
    freeze_stages(model, None)  # medfed's freezing: FrozenBatchNorm, head still trainable
    cam = grad_cam(model, _image(), target_class=2)
    assert cam.max() == pytest.approx(1.0)
    model.requires_grad_(False)
    assert np.allclose(grad_cam(model, _image(), target_class=2), cam)
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_timm_backbone():
    model = _model("test_mambaout")
    cam = grad_cam(model, _image(), target_class=0)
    assert cam.shape == (64, 96)
    assert cam.max() == pytest.approx(1.0)


def test_rejects_what_grad_cam_cannot_explain():
    with pytest.raises(ValueError, match="target_class 3"):
        grad_cam(_model(), _image(), target_class=3)
    with pytest.raises(ValueError, match="convolutional feature map"):
        grad_cam(_model("test_vit"), _image(160, 160), target_class=0)


@pytest.mark.parametrize("model", [BrightDarkDetector(), ChannelsLastDetector()],
                         ids=["channels_first", "channels_last"])
def test_map_points_at_the_evidence_for_each_class(model):
    image = _bright_and_dark_squares()
    bright = grad_cam(model, image, target_class=1)
    dark = grad_cam(model, image, target_class=0)
    row, col = np.unravel_index(bright.argmax(), bright.shape)
    assert 4 <= row < 12 and 4 <= col < 12
    row, col = np.unravel_index(dark.argmax(), dark.shape)
    assert 20 <= row < 28 and 36 <= col < 44
    assert bright[:16, :24].sum() / bright.sum() > 0.95
    assert dark[16:, 24:].sum() / dark.sum() > 0.95


def test_no_evidence_gives_an_all_zero_map():
    image = torch.zeros(3, 32, 48)
    image[:, 4:12, 4:12] = 1.0  # nothing dark: class 0 has no evidence anywhere
    cam = grad_cam(BrightDarkDetector(), image, target_class=0)
    assert cam.shape == (32, 48)
    assert np.array_equal(cam, np.zeros((32, 48), dtype=np.float32))


def _lesion_batch(n: int, generator: torch.Generator):
    """Noise images; label 1 adds a bright 16x16 'lesion' in a random spot of a random half."""
    images = torch.randn(n, 3, 64, 64, generator=generator) * 0.3
    labels = torch.randint(0, 2, (n,), generator=generator)
    right = torch.randint(0, 2, (n,), generator=generator).bool()
    for i in labels.nonzero().flatten().tolist():
        row = int(torch.randint(0, 48, (1,), generator=generator))
        col = int(torch.randint(0, 16, (1,), generator=generator))
        col = 48 - col if right[i] else col
        images[i, :, row:row + 16, col:col + 16] += 2.0
    return images, labels, right


def test_trained_resnet_looks_at_the_lesion():
    """A timm ResNet trained to detect a bright square explains 'lesion present' on the side
    where the square is."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    # Layers this small gain nothing from threads, and lose several-fold on a busy CI machine.
    torch.set_num_threads(1)
    try:
        for _ in range(20):
            images, labels, _ = _lesion_batch(16, generator)
            loss = F.cross_entropy(model(images), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    images, labels, right = _lesion_batch(40, generator)
    with torch.no_grad():
        assert (model(images).argmax(dim=1) == labels).float().mean() > 0.9
    correct_side = []
    for image, is_right in zip(images[labels == 1], right[labels == 1]):
        cam = grad_cam(model, image, target_class=1)
        right_share = cam[:, 32:].sum() / cam.sum()
        correct_side.append((right_share > 0.5) == bool(is_right))
    assert len(correct_side) >= 10
    assert np.mean(correct_side) >= 0.9


def test_overlay_blends_colormap_over_image():
    gray = np.full((20, 30), 100, dtype=np.uint8)
    heat = np.zeros((5, 6), dtype=np.float32)  # smaller than the image: resized
    heat[:, 3:] = 1.0
    blended = overlay(gray, heat, alpha=0.5)
    assert blended.shape == (20, 30, 3) and blended.dtype == np.uint8
    # jet: 0 is dark blue (0, 0, 127.5), 1 is dark red (127.5, 0, 0).
    assert blended[0, 0].tolist() == [50, 50, 114]
    assert blended[0, -1].tolist() == [114, 50, 50]

    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    assert np.array_equal(overlay(rgb, np.zeros((8, 8)), alpha=0.0), rgb)
    with pytest.raises(ValueError, match="image"):
        overlay(np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((4, 4)))


@pytest.mark.parametrize("size, factor", [(28, 8), (64, 4), (224, 1)])
def test_side_by_side_enlarges_the_image_without_smoothing(size, factor):
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:16] = 1.0  # evidence in the upper half only
    panel = side_by_side(image, heat)
    shown = size * factor
    assert panel.shape == (shown, 2 * shown + 8, 3) and panel.dtype == np.uint8
    # Left: every decoded pixel as a factor x factor block of itself, nothing in between.
    left = panel[:, :shown]
    expected = np.kron(image, np.ones((factor, factor), dtype=np.uint8))
    assert np.array_equal(left, np.stack([expected] * 3, axis=-1))
    assert (panel[:, shown:shown + 8] == 255).all()
    # Right: the same pixels under the heat map, warm above and cool below, with a smooth
    # (bilinear) band between the halves rather than a hard step.
    right = panel[:, shown + 8:].astype(int)
    assert np.array_equal(right, overlay(expected, heat).astype(int))
    assert right[: shown // 4, :, 0].mean() > right[-shown // 4:, :, 0].mean()
    blues = overlay(np.zeros((shown, shown), np.uint8), heat)[:, shown // 2, 2].astype(int)
    assert len(np.unique(blues)) > 3
