"""The seed paper's architectures through timm: head, stage freezing, wire keys, offline hub."""

from __future__ import annotations

import time

import huggingface_hub.constants
import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from medfed.common import wire
from medfed.common.config import ModelConfig
from medfed.common.errors import MedfedError
from medfed.common.model import (
    OFFLINE_IMAGENET, PAPER_BACKBONES, build_model, native_input_size, stage_groups,
)

# Stages after the stem. VGG's are single convs (timm groups VGG by layer), the 13th being its
# fc6/fc7 `pre_logits`; VGG-BN's BatchNorms sit with their convs, so both VGGs count alike.
STAGES = {
    "vgg16": 13, "vgg16_bn": 13, "resnet50": 4, "densenet121": 4, "inception_v3": 12,
    "tf_efficientnet_lite0": 7, "resnet18": 4,
}
# Small inputs keep VGG16 (138M parameters) and friends fast; InceptionV3 needs at least 75.
IMAGE_SIZE = {"inception_v3": 75}
NUM_CLASSES = 3


def _build(backbone: str, freeze: str, *, weights: str = "none"):
    return build_model(ModelConfig(backbone=backbone, weights=weights, freeze=freeze),
                       num_classes=NUM_CLASSES, seed=0)


def _classifier_params(model) -> list[str]:
    head = model.pretrained_cfg["classifier"]
    return [f"{head}.weight", f"{head}.bias"]


def test_paper_backbones_are_timm_names():
    assert set(PAPER_BACKBONES) == set(STAGES)
    assert all(timm.is_model(name) for name in PAPER_BACKBONES)


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_stage_groups_are_stem_stages_head(backbone):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = timm.create_model(backbone, num_classes=NUM_CLASSES)
    modules, params = stage_groups(model)
    assert len(params) - 2 == STAGES[backbone]
    assert params[-1] == _classifier_params(model)
    assert all(params)
    flat = [name for group in params for name in group]
    assert sorted(flat) == sorted(name for name, _ in model.named_parameters())
    # A stage is more than normalization layers: those join the layer they normalize.
    norm_only = [group for group in modules[1:-1] if all(
        isinstance(model.get_submodule(m), (_BatchNorm, torch.nn.LayerNorm)) for m in group)]
    assert norm_only == []


@pytest.mark.parametrize("freeze", ["middle", "all"])
@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_frozen_stages_train_and_exchange_correctly(backbone, freeze):
    freeze = str(STAGES[backbone] // 2) if freeze == "middle" else freeze
    model = _build(backbone, freeze)
    had_batchnorm = backbone != "vgg16"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen
    if freeze == "all":
        assert sorted(trainable) == sorted(_classifier_params(model))
    else:
        assert set(_classifier_params(model)) < set(trainable)

    # Frozen BatchNorm (plain or timm's BatchNormAct2d) became FrozenBatchNorm*: every BatchNorm
    # left can learn, so its statistics may move; the frozen ones' cannot.
    batchnorms = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert all(p.requires_grad for m in batchnorms.values() for p in m.parameters())
    frozen_bn = [n for n, m in model.named_modules()
                 if type(m).__name__.startswith("FrozenBatchNorm")]
    assert bool(frozen_bn) == had_batchnorm
    if freeze == "all":
        assert batchnorms == {}
    else:
        assert bool(batchnorms) == had_batchnorm

    keys = wire.exchanged_keys(model, bn="avg")
    statistics = wire.statistic_keys(keys)
    assert sorted(set(keys) - set(statistics)) == sorted(trainable)
    assert {k.rsplit(".", 1)[0] for k in statistics} == set(batchnorms)
    assert len(statistics) == 2 * len(batchnorms)
    local = wire.exchanged_keys(model, bn="local")
    assert not any(k.rsplit(".", 1)[0] in batchnorms for k in local)
    assert set(local) == {k for k in trainable if k.rsplit(".", 1)[0] not in batchnorms}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = IMAGE_SIZE.get(backbone, 64)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    logits = model(images)
    assert logits.shape == (2, NUM_CLASSES)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    optimizer.step()

    after = model.state_dict()
    untouched = [k for k in before if k not in keys and not k.endswith("num_batches_tracked")]
    assert set(frozen) <= set(untouched)
    assert not had_batchnorm or any(k.endswith("running_var") for k in untouched)
    changed = [k for k in untouched if not torch.equal(before[k], after[k])]
    assert changed == []
    assert any(not torch.equal(before[k], after[k]) for k in trainable)
    assert all(not torch.equal(before[k], after[k]) for k in statistics)


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_out_of_range_freeze_names_the_range(backbone):
    stages = STAGES[backbone]
    with pytest.raises(MedfedError) as info:
        _build(backbone, str(stages + 1))
    assert f"0..{stages}" in str(info.value) and "'all'" in str(info.value)


def test_native_input_size():
    assert native_input_size("inception_v3") == 299
    assert native_input_size("resnet50") == 224
    assert {native_input_size(name) for name in PAPER_BACKBONES} == {224, 299}
    with pytest.raises(MedfedError, match="unknown backbone"):
        native_input_size("inception_v9")


def test_imagenet_without_hub_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    # huggingface_hub reads these at import time, so the environment alone would not reach it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(MedfedError) as info:
        _build("resnet18", "all", weights="imagenet")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "'resnet18'" in message and "could not be reached" in message
    assert "not in the local Hugging Face cache" in message
    assert "--weights PATH" in message and "--weights none" in message
    assert all(name in message for name in OFFLINE_IMAGENET)


def test_imagenet_for_a_backbone_timm_has_no_weights_for():
    with pytest.raises(MedfedError, match="timm has no pretrained weights for 'coatnet_0_224'"):
        _build("coatnet_0_224", "all", weights="imagenet")
