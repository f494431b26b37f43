"""MedMNIST npz reading/writing, locating/downloading files, and image transforms."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch

from medfed.common import medmnist
from medfed.common.config import DataConfig, ModelConfig
from medfed.common.dataset import LabelledImages, TransformedImages, load_splits, save_splits
from medfed.common.errors import MedfedError
from medfed.common.medmnist_catalogue import RECORD_URL
from medfed.common.model import build_model
from medfed.common.transforms import build_transform


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig(backbone="test_efficientnet", weights="none", freeze="0"),
                       num_classes=2, seed=0)


# --- load_splits / save_splits -----------------------------------------------------------------

@pytest.mark.parametrize("name, side", [("breastmnist.npz", 28), ("breastmnist_64.npz", 64)])
def test_load_breastmnist(medmnist_dir, name, side):
    path = medmnist_dir / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    splits = load_splits(path)
    assert list(splits) == ["train", "val", "test"]
    sizes = {split: len(data) for split, data in splits.items()}
    assert sizes == {"train": 546, "val": 78, "test": 156}
    for data in splits.values():
        assert data.images.dtype == np.uint8
        assert data.images.shape[1:] == (side, side)
        assert data.images.flags.c_contiguous
        assert data.labels.dtype == np.int64 and data.labels.ndim == 1
        assert set(np.unique(data.labels).tolist()) == {0, 1}
    # BreastMNIST is ~73% positive (class 1 = normal/benign).
    assert 0.65 < splits["train"].labels.mean() < 0.8
    assert splits["train"].histogram(2) == [
        int((splits["train"].labels == 0).sum()), int((splits["train"].labels == 1).sum())]


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"this is not a zip archive at all" * 4)
    with pytest.raises(MedfedError) as info:
        load_splits(path)
    assert str(path) in str(info.value)
    assert "not a readable MedMNIST npz" in str(info.value)


def test_truncated_file_names_the_file(medmnist_dir, tmp_path):
    path = tmp_path / "breastmnist.npz"
    path.write_bytes((medmnist_dir / "breastmnist.npz").read_bytes()[:5000])
    with pytest.raises(MedfedError) as info:
        load_splits(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(MedfedError) as info:
        load_splits(path)
    assert str(path) in str(info.value)


def test_npz_without_splits(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(MedfedError, match="holds no train_images") as info:
        load_splits(path)
    assert str(path) in str(info.value)


def test_npz_wrong_dtype(tmp_path):
    path = tmp_path / "float.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.float32), train_labels=np.zeros((2, 1)))
    with pytest.raises(MedfedError, match="train_images must be uint8"):
        load_splits(path)


def test_npz_count_mismatch(tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(MedfedError, match="3 images but 2 labels"):
        load_splits(path)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": LabelledImages(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
                                np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)),
        "val": LabelledImages(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
                              np.array([1, 0], dtype=np.int64)),
        "test": LabelledImages(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
                               np.array([2, 2, 0], dtype=np.int64)),
    }
    path = tmp_path / "site.npz"
    save_splits(path, splits)
    with np.load(path) as npz:  # MedMNIST layout: labels shaped (N, 1)
        assert npz["train_labels"].shape == (6, 1)
    again = load_splits(path)
    assert again.keys() == splits.keys()
    for split in splits:
        np.testing.assert_array_equal(again[split].images, splits[split].images)
        np.testing.assert_array_equal(again[split].labels, splits[split].labels)
        assert again[split].labels.dtype == np.int64


def test_save_load_real_subset(medmnist_dir, tmp_path):
    original = load_splits(medmnist_dir / "breastmnist.npz")
    subset = {split: data.subset(np.arange(10)) for split, data in original.items()}
    save_splits(tmp_path / "site.npz", subset)
    again = load_splits(tmp_path / "site.npz")
    for split in subset:
        np.testing.assert_array_equal(again[split].images, original[split].images[:10])
        np.testing.assert_array_equal(again[split].labels, original[split].labels[:10])


# --- locating and downloading ------------------------------------------------------------------

def test_locate_existing_file(medmnist_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not download a file that is present")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert medmnist.locate("breastmnist", 28, medmnist_dir) == medmnist_dir / "breastmnist.npz"
    assert medmnist.locate("breastmnist", 64, medmnist_dir) == medmnist_dir / "breastmnist_64.npz"


def test_file_names():
    assert medmnist.file_name("pneumoniamnist", 28) == "pneumoniamnist.npz"
    assert medmnist.file_name("pneumoniamnist", 224) == "pneumoniamnist_224.npz"


def test_locate_missing_without_download(tmp_path):
    with pytest.raises(MedfedError) as info:
        medmnist.locate("dermamnist", 64, tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "dermamnist_64.npz") in message
    assert f"{RECORD_URL}/dermamnist_64.npz" in message
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed: the tests below must not depend on $MEDFED_OFFLINE of the machine."""
    monkeypatch.delenv("MEDFED_OFFLINE", raising=False)


def test_locate_medfed_offline_never_downloads(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("MEDFED_OFFLINE=1 must not try the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("MEDFED_OFFLINE", "1")
    with pytest.raises(MedfedError) as info:
        medmnist.locate("breastmnist", 28, tmp_path, download=True)
    message = str(info.value)
    assert str(tmp_path / "breastmnist.npz") in message
    assert f"{RECORD_URL}/breastmnist.npz" in message
    assert list(tmp_path.iterdir()) == []


def test_locate_download_offline(tmp_path, monkeypatch, online):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    directory = tmp_path / "cache" / "medmnist"
    with pytest.raises(MedfedError) as info:
        medmnist.locate("breastmnist", 28, directory, download=True)
    message = str(info.value)
    target = directory / "breastmnist.npz"
    assert calls == [f"{RECORD_URL}/breastmnist.npz?download=1"]
    assert f"put it at {target}" in message
    assert calls[0] in message
    assert "MEDFED_DATA_DIR" in message
    assert list(directory.iterdir()) == []  # no partial file left behind
    assert not target.exists()


class _FakeResponse:
    def __init__(self, payload: bytes):
        self._payload = payload
        self._offset = 0

    def read(self, size=-1):
        if size is None or size < 0:
            size = len(self._payload)
        chunk = self._payload[self._offset:self._offset + size]
        self._offset += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_wrong_md5_leaves_nothing(tmp_path, monkeypatch, online):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(b"x" * 1000))
    with pytest.raises(MedfedError, match="MD5"):
        medmnist.locate("breastmnist", 28, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_right_md5_moves_file_in_place(medmnist_dir, tmp_path, monkeypatch,
                                                online):
    payload = (medmnist_dir / "breastmnist.npz").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(payload))
    path = medmnist.locate("breastmnist", 28, tmp_path)
    assert path == tmp_path / "breastmnist.npz"
    assert path.read_bytes() == payload
    assert list(tmp_path.iterdir()) == [path]


def test_data_dir_precedence(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    monkeypatch.setenv("MEDFED_DATA_DIR", str(env))
    assert medmnist.data_dir(str(explicit)) == explicit
    assert medmnist.data_dir(None) == env
    monkeypatch.delenv("MEDFED_DATA_DIR")
    cache = Path(platformdirs.user_cache_dir("medfed")) / "medmnist"
    assert medmnist.data_dir(None) == cache
    monkeypatch.setenv("MEDFED_DATA_DIR", "")  # empty counts as unset
    assert medmnist.data_dir(None) == cache
    monkeypatch.setenv("HOME", str(tmp_path))
    assert medmnist.data_dir("~/data") == tmp_path / "data"


# --- transforms --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [28, 32, 64])
def test_eval_transform_normalises_with_model_stats(tiny_model, size):
    import timm

    data_config = timm.data.resolve_model_data_config(tiny_model)
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    assert not torch.equal(mean[0], mean[1])  # per-channel stats make the check meaningful

    value = 200
    images = np.full((1, 28, 28), value, dtype=np.uint8)
    dataset = TransformedImages(LabelledImages(images, np.array([1])),
                                build_transform(tiny_model, DataConfig(image_size=size), train=False))
    tensor, label = dataset[0]
    assert label == 1
    assert tensor.dtype == torch.float32
    assert tensor.shape == (3, size, size)
    expected = ((value / 255.0 - mean) / std).expand(3, size, size)
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=1e-5)


def test_eval_transform_keeps_pixels_at_native_size(tiny_model):
    import timm

    data_config = timm.data.resolve_model_data_config(tiny_model)
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    image = np.random.default_rng(1).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    dataset = TransformedImages(LabelledImages(image, np.array([0])),
                                build_transform(tiny_model, DataConfig(image_size=28), train=False))
    tensor, _ = dataset[0]
    gray = torch.from_numpy(image[0].astype(np.float32) / 255.0)
    torch.testing.assert_close(tensor, (gray - mean) / std, atol=1e-5, rtol=1e-5)
    # Eval is deterministic.
    torch.testing.assert_close(dataset[0][0], tensor, atol=0, rtol=0)


def test_eval_transform_rgb_image(tiny_model):
    image = np.random.default_rng(2).integers(0, 256, (1, 30, 30, 3), dtype=np.uint8)
    dataset = TransformedImages(LabelledImages(image, np.array([0])),
                                build_transform(tiny_model, DataConfig(image_size=32), train=False))
    tensor, _ = dataset[0]
    assert tensor.shape == (3, 32, 32)
    assert not torch.equal(tensor[0], tensor[1])


@pytest.mark.parametrize("seed", [None, 0])
def test_train_transform_draws_per_call(tiny_model, seed):
    image = np.random.default_rng(3).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    dataset = TransformedImages(LabelledImages(image, np.array([0])),
                                build_transform(tiny_model, DataConfig(image_size=32), train=True, seed=seed))
    outputs = [dataset[0][0] for _ in range(6)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    distinct = {tuple(o.flatten()[:256].tolist()) for o in outputs}
    assert len(distinct) >= 2  # all six identical has probability ~1e-6 unseeded


def test_train_transform_seed_reproducible(tiny_model):
    image = np.random.default_rng(4).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    first = build_transform(tiny_model, DataConfig(image_size=32), train=True, seed=7)
    again = build_transform(tiny_model, DataConfig(image_size=32), train=True, seed=7)
    a = [first(image=image)["image"] for _ in range(3)]
    b = [again(image=image)["image"] for _ in range(3)]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], a[1])
