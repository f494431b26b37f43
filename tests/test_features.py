"""Frozen features computed once (common/features.py), the stages they serve (common/schedule.py,
common/wire.py) and a round's budget in steps (common/training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from commands import medfed

from medfed.common import features, wire
from medfed.common.config import Config, TrainConfig
from medfed.common.config_checks import validate
from medfed.common.config_loading import set_value
from medfed.common.dataset import LabelledImages, TransformedImages
from medfed.common.errors import MedfedError
from medfed.common.model import build_model
from medfed.common.schedule import FINETUNE, HEAD, Stages
from medfed.common.training import train_head, train_local
from medfed.common.transforms import build_transform

CPU = torch.device("cpu")


def _config(backbone: str = "test_efficientnet", *, freeze: str = "all", views: int = 0) -> Config:
    config = Config()
    config.model.backbone, config.model.weights, config.model.freeze = backbone, "none", freeze
    config.data.image_size = 32
    config.train.feature_views = views
    return config


def _images(n: int = 12, seed: int = 0) -> LabelledImages:
    rng = np.random.default_rng(seed)
    return LabelledImages(rng.integers(0, 256, size=(n, 32, 32), dtype=np.uint8),
                          np.arange(n) % 2)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_loss_and_gradients_on_cached_features_equal_the_full_forward_pass(backbone):
    config = _config(backbone)
    model = build_model(config.model, num_classes=2, seed=0).eval()
    data = _images()
    values, labels = features.site_features(model, data, config=config, train=False,
                                            cache_dir=None, device=CPU)
    shown = TransformedImages(data, build_transform(model, config.data, train=False))
    images = torch.stack([shown[i][0] for i in range(len(data))])
    targets = torch.from_numpy(labels)
    head = features.classifier(model)

    full = torch.nn.functional.cross_entropy(model(images), targets)
    full_grads = torch.autograd.grad(full, list(head.parameters()))
    cached = torch.nn.functional.cross_entropy(head(torch.from_numpy(values)), targets)
    cached_grads = torch.autograd.grad(cached, list(head.parameters()))

    assert cached.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(cached_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_cache_is_reused_and_a_changed_setting_never_reads_stale_features(tmp_path):
    config = _config()
    model = build_model(config.model, num_classes=2, seed=0)
    data = _images()
    first, _ = features.site_features(model, data, config=config, train=False,
                                      cache_dir=tmp_path, device=CPU)
    cached = sorted(tmp_path.glob("features-*.npy"))
    assert len(cached) == 1
    # A restarted process reads the file instead of recomputing: a marked file comes back.
    np.save(cached[0], np.full_like(first, 7.0))
    again, _ = features.site_features(model, data, config=config, train=False,
                                      cache_dir=tmp_path, device=CPU)
    assert (again == 7.0).all()
    config.data.equalize = "clahe"
    other, _ = features.site_features(model, data, config=config, train=False,
                                      cache_dir=tmp_path, device=CPU)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2
    assert not (other == 7.0).all()


def test_augmented_views_are_fixed_and_counted():
    config = _config(views=3)
    model = build_model(config.model, num_classes=2, seed=0)
    data = _images()
    values, labels = features.site_features(model, data, config=config, train=True,
                                            cache_dir=None, device=CPU)
    assert values.shape[0] == 3 * len(data) and labels.tolist() == np.tile(data.labels, 3).tolist()
    # The views differ from one another (augmentation) but are the same in every process.
    assert not np.allclose(values[:len(data)], values[len(data):2 * len(data)])
    repeat, _ = features.site_features(model, data, config=config, train=True,
                                       cache_dir=None, device=CPU)
    np.testing.assert_array_equal(values, repeat)
    plain, _ = features.site_features(model, data, config=config, train=False,
                                      cache_dir=None, device=CPU)
    assert plain.shape[0] == len(data)


def test_stage_switch_decides_which_keys_train_and_travel():
    config = _config(freeze="1")
    config.federation.rounds, config.federation.head_rounds = 5, 2
    stages = Stages.of_config(config)
    assert [stages.of(r) for r in range(0, 6)] == [HEAD, HEAD, HEAD, FINETUNE, FINETUNE, FINETUNE]
    assert stages.start_lr(HEAD) == config.train.head_lr and stages.start_lr(FINETUNE) == config.train.lr
    model = build_model(config.model, num_classes=2, seed=0)
    head = wire.exchanged_keys(model, bn="avg", stage=HEAD)
    finetune = wire.exchanged_keys(model, bn="avg", stage=FINETUNE)
    assert head == ["classifier.weight", "classifier.bias"]
    assert set(head) < set(finetune) and any(k.startswith("blocks.") for k in finetune)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(head) <= trainable
    # Head only: every round is a head round, whatever head_rounds says.
    config.model.freeze = "all"
    assert {Stages.of_config(config).of(r) for r in range(6)} == {HEAD}


def test_train_head_changes_the_classifier_only_through_the_same_loop():
    config = _config()
    model = build_model(config.model, num_classes=2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values, labels = features.site_features(model, _images(), config=config, train=False,
                                            cache_dir=None, device=CPU)
    loss = train_head(features.classifier(model), values, labels,
                      config=TrainConfig(local_steps=3, batch_size=4), lr=1e-2, proximal_mu=0.0,
                      device=CPU, seed=0).loss
    assert np.isfinite(loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("steps", [1, 5])
def test_local_steps_take_exactly_that_many_optimizer_steps(tiny_images, steps):
    config = _config(freeze="0")
    model = build_model(config.model, num_classes=2, seed=0)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    train_local(model, tiny_images, transform=build_transform(model, config.data, train=True, seed=0),
                config=TrainConfig(local_steps=steps, batch_size=3), lr=1e-3, proximal_mu=0.0,
                device=CPU, seed=0)
    # 8 images in batches of 3 (last partial one dropped): the passes repeat to reach the steps.
    assert len(calls) == steps and set(calls) == {3}


@pytest.mark.parametrize("assignments, fragment", [
    ({"train.local_steps": 0}, "train.local_steps"),
    ({"train.feature_views": 2, "data.augment": False}, "augmented views need augmentation"),
    ({"federation.head_rounds": 11}, "cannot be longer than the run"),
    ({"model.freeze": "all", "model.weights": "none"}, "a head on random frozen features"),
    ({"federation.head_rounds": 2, "model.weights": "none"}, "a head on random frozen features"),
])
def test_bad_stage_settings_are_refused_before_training(assignments, fragment):
    config = Config()
    for key, value in assignments.items():
        set_value(config, key, value)
    with pytest.raises(MedfedError, match=fragment):
        validate(config)


@pytest.mark.parametrize("options, fragment", [
    (["--local-steps", "0"], "train.local_steps"),
    (["--feature-views", "2", "--set", "data.augment=false"], "augmented views need augmentation"),
    (["--freeze", "3", "--rounds", "4", "--head-rounds", "6"], "cannot be longer than the run"),
    (["--weights", "none"], "a head on random frozen features"),
])
def test_bad_stage_options_are_one_line_before_anything_runs(options, fragment, tmp_path):
    out = tmp_path / "run"
    result = medfed("simulate", "--dataset", "breastmnist", *options, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not out.exists() and not out.with_name("run.incomplete").exists()
