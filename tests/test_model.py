"""Backbones: freezing, what travels on the wire, frozen BatchNorm, seeding, weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from medfed.common.training import train_local
from medfed.common import wire
from medfed.common.config import DataConfig, ModelConfig, TrainConfig
from medfed.common.errors import MedfedError
from medfed.common.model import build_model, load_checkpoint, load_imagenet, stage_groups
from medfed.common.schedule import FINETUNE, HEAD
from medfed.common.transforms import build_transform

TINY = "test_efficientnet"


def _build(freeze="2", *, backbone=TINY, weights="none", seed=0, num_classes=2):
    return build_model(ModelConfig(backbone=backbone, weights=weights, freeze=freeze),
                       num_classes=num_classes, seed=seed)


def _frozen_bn_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__.startswith("FrozenBatchNorm")]


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (a) freezing and the exchanged keys -------------------------------------------------------

@pytest.mark.parametrize("backbone", [TINY, "test_resnet"])
def test_exchanged_keys_are_trainable_part_only(backbone):
    model = _build("2", backbone=backbone)
    modules, params = stage_groups(model)
    frozen_params = {name for group in params[:3] for name in group}       # stem + 2 stages
    frozen_modules = [name for group in modules[:3] for name in group]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not frozen_params & set(trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen_params)

    trainable_bns = [n for n, m in model.named_modules()
                     if isinstance(m, _BatchNorm) and m.weight.requires_grad]
    assert trainable_bns  # the tiny models do have BatchNorm above the frozen stages
    keys = wire.exchanged_keys(model, bn="avg")
    expected = set(trainable) | {f"{n}.{s}" for n in trainable_bns
                                 for s in ("running_mean", "running_var")}
    assert set(keys) == expected
    assert len(keys) == len(set(keys))
    assert keys == [k for k in model.state_dict() if k in expected]  # state-dict order
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    assert not any(k.startswith(tuple(f"{m}." for m in frozen_modules)) for k in keys)
    assert not any(k.startswith(tuple(f"{m}." for m in _frozen_bn_names(model))) for k in keys)
    assert set(wire.statistic_keys(keys)) == expected - set(trainable)


def test_bn_local_exchanges_no_batchnorm_tensor():
    model = _build("2")
    bn_modules = [n for n, m in model.named_modules() if "BatchNorm" in type(m).__name__]
    keys = wire.exchanged_keys(model, bn="local")
    assert keys
    assert not any(k.rsplit(".", 1)[0] in bn_modules for k in keys)
    assert wire.statistic_keys(keys) == []
    # Everything else trainable still travels.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(keys) == {k for k in trainable if k.rsplit(".", 1)[0] not in bn_modules}
    # The BatchNorm state kept at the site is exactly the trainable BatchNorm's state.
    local = wire.local_keys(model, bn="local")
    assert local and all(k.rsplit(".", 1)[0] in bn_modules for k in local)
    assert not any(k.endswith("num_batches_tracked") for k in local)
    assert not set(local) & set(keys)
    assert wire.local_keys(model, bn="avg") == []


@pytest.mark.parametrize("backbone", [TINY, "test_resnet"])
def test_freeze_all_trains_head_only(backbone):
    model = _build("all", backbone=backbone)
    head = model.default_cfg["classifier"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted([f"{head}.weight", f"{head}.bias"])
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert wire.exchanged_keys(model, bn="avg") == [f"{head}.weight", f"{head}.bias"]


@pytest.mark.parametrize("freeze", ["all", "3", "0"])
def test_the_head_stage_exchanges_the_classifier_alone(freeze):
    """The head stage's keys (what travels in its rounds) are the classifier's parameters, a part
    of the fine-tune stage's keys, with no BatchNorm statistics."""
    model = _build(freeze)
    head = model.default_cfg["classifier"]
    keys = wire.exchanged_keys(model, bn="avg", stage=HEAD)
    assert keys == [f"{head}.weight", f"{head}.bias"]
    assert set(keys) <= set(wire.exchanged_keys(model, bn="avg", stage=FINETUNE))
    assert wire.exchanged_keys(model, bn="avg") == wire.exchanged_keys(model, bn="avg", stage=FINETUNE)


@pytest.mark.parametrize("backbone", [TINY, "test_resnet"])
def test_freeze_zero_trains_everything(backbone):
    model = _build("0", backbone=backbone)
    assert all(p.requires_grad for p in model.parameters())
    assert _frozen_bn_names(model) == []
    keys = wire.exchanged_keys(model, bn="avg")
    expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert keys == expected


def test_freeze_stage_count_changes_trainable_set():
    counts = [sum(p.requires_grad for p in _build(str(n)).parameters()) for n in range(6)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[5] > 0


@pytest.mark.parametrize("freeze", ["6", "99"])
def test_out_of_range_freeze(freeze):
    with pytest.raises(MedfedError) as info:
        _build(freeze)
    message = str(info.value)
    assert f"--freeze {freeze}" in message
    assert "0..5" in message and "'all'" in message


# --- (b) frozen BatchNorm stays frozen during local training ------------------------------------

def test_train_local_leaves_frozen_part_bit_identical(tiny_images):
    torch.manual_seed(0)
    model = _build("2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    exchanged = set(wire.exchanged_keys(model, bn="avg"))
    frozen_keys = [k for k in before
                   if k not in exchanged and not k.endswith("num_batches_tracked")]
    frozen_bn_keys = [k for k in frozen_keys if k.rsplit(".", 1)[0] in _frozen_bn_names(model)]
    assert frozen_bn_keys and any(k.endswith("running_var") for k in frozen_bn_keys)

    transform = build_transform(model, DataConfig(image_size=32), train=True, seed=0)
    config = TrainConfig(batch_size=len(tiny_images), local_epochs=1, device="cpu")
    loss = train_local(model, tiny_images, transform=transform, config=config, lr=1e-2,
                       proximal_mu=0.0, device=torch.device("cpu"), seed=0).loss
    assert np.isfinite(loss) and loss > 0

    after = model.state_dict()
    for key in frozen_keys:
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert len(changed) == len(trainable), set(trainable) - set(changed)
    statistics = wire.statistic_keys(sorted(exchanged))
    assert statistics
    assert all(not torch.equal(before[k], after[k]) for k in statistics)


# --- (c) seeding -------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", [TINY, "test_resnet"])
def test_same_seed_same_model(backbone):
    torch.manual_seed(1)
    first = _build("2", backbone=backbone, seed=4).state_dict()
    torch.manual_seed(2)  # the global RNG must not matter
    again = _build("2", backbone=backbone, seed=4).state_dict()
    other = _build("2", backbone=backbone, seed=5).state_dict()
    assert _states_equal(first, again)
    assert not _states_equal(first, other)


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    _build("2", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_backbone():
    with pytest.raises(MedfedError, match="unknown backbone 'efficientnet_b99'"):
        _build(backbone="efficientnet_b99")


# --- (d) offline ImageNet weights ------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    return load_imagenet("tf_efficientnet_lite0").eval()


@pytest.mark.parametrize("image_name, allowed", [
    ("chelsea", range(281, 286)),   # ImageNet cats: tabby, tiger, Persian, Siamese, Egyptian
    ("coffee", [967]),              # espresso
])
def test_offline_imagenet_weights_classify_real_photos(lite0, image_name, allowed):
    skimage_data = pytest.importorskip("skimage.data")
    timm = pytest.importorskip("timm")
    from PIL import Image

    data_config = timm.data.resolve_model_data_config(lite0)
    assert data_config["input_size"] == (3, 224, 224)
    transform = timm.data.create_transform(**data_config)
    image = Image.fromarray(getattr(skimage_data, image_name)())
    with torch.no_grad():
        logits = lite0(transform(image).unsqueeze(0))
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) in allowed


def test_imagenet_build_replaces_head():
    model = build_model(ModelConfig(weights="imagenet", freeze="all"), num_classes=2, seed=0)
    assert model.get_classifier().out_features == 2
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight", "classifier.bias"]


# --- (e) hub weights unreachable ---------------------------------------------------------------

def test_hub_failure_is_a_medfed_error(monkeypatch):
    real_create = timm.create_model
    calls = []

    def offline_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(MedfedError) as info:
        build_model(ModelConfig(backbone="resnet18", weights="imagenet"), num_classes=2, seed=0)
    message = str(info.value)
    assert calls == [("resnet18", True)]
    assert "resnet18" in message
    assert "--weights" in message
    assert "OSError" in message and "couldn't connect" in message
    assert "more detail" not in message  # first line only
    assert "tf_efficientnet_lite0" in message  # points at an offline backbone


# --- (f) local checkpoints ---------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    source = _build("0", seed=1)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    loaded = _build("0", weights=str(path), seed=2)
    fresh = _build("0", seed=2)
    assert _states_equal(loaded.state_dict(), source.state_dict())
    assert not _states_equal(fresh.state_dict(), source.state_dict())


def test_checkpoint_round_trip_frozen(tmp_path):
    source = _build("2", seed=1)
    path = tmp_path / "model.pt"
    torch.save({"model": _build("0", seed=1).state_dict(), "round": 3}, path)  # medfed layout
    loaded = _build("2", weights=str(path), seed=7)
    assert _states_equal(loaded.state_dict(), source.state_dict())


def test_checkpoint_other_head_size_keeps_new_head(tmp_path):
    source = _build("0", seed=1, num_classes=5)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    loaded = _build("0", weights=str(path), seed=2, num_classes=2).state_dict()
    fresh = _build("0", seed=2, num_classes=2).state_dict()
    src = source.state_dict()
    for key, value in loaded.items():
        if key.startswith("classifier."):
            assert torch.equal(value, fresh[key])
        else:
            assert torch.equal(value, src[key]), key


def test_checkpoint_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(MedfedError, match="no such file") as info:
        _build(weights=str(missing))
    assert str(missing) in str(info.value)


def test_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(MedfedError, match="not a readable PyTorch checkpoint"):
        _build(weights=str(path))


def test_checkpoint_missing_and_unexpected_keys(tmp_path):
    state = _build("0").state_dict()
    del state["conv_stem.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(MedfedError, match="does not match backbone") as info:
        load_checkpoint(_build("0"), str(path))
    message = str(info.value)
    assert "1 missing keys" in message and "conv_stem.weight" in message
    assert "1 unexpected keys" in message and "extra.weight" in message


def test_checkpoint_of_other_backbone(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(_build("0", backbone="test_resnet").state_dict(), path)
    with pytest.raises(MedfedError, match="does not match backbone"):
        load_checkpoint(_build("0"), str(path))
