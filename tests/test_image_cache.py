"""A deployed site decodes its folder once: the cache of arrays on disk in its state directory."""

from __future__ import annotations

import errno
import io
import json
import os

import numpy as np
import pytest
import torch
from imagefiles import gradient, write_dicom, write_png

import medfed
from medfed.client import image_cache
from medfed.client.image_cache import Request, site_splits
from medfed.common import sources
from medfed.common.dataset import SPLITS, TransformedImages
from medfed.common.disk_images import DiskImages, DiskImagesWriter
from medfed.common.errors import MedfedError

CLASSES = ("normal", "pneumonia")


def _folder(root, count=24, *, rgb_at=None):
    for i in range(count):
        pixels = gradient(i)
        if i == rgb_at:
            pixels = np.stack([pixels, pixels[::-1], pixels], axis=2)
        write_png(root / CLASSES[i % 2] / f"{i:03d}.png", pixels)
    return root


def _request(**changes):
    return Request(**{"image_size": 16, "frame": None, "skip_bad": False, "classes": CLASSES,
                      "seed": 7, "site": "hospital-a", **changes})


@pytest.fixture
def decodes(monkeypatch):
    """How many files were decoded."""
    count = {"files": 0}
    read = sources.read_image

    def counting(*args, **kwargs):
        count["files"] += 1
        return read(*args, **kwargs)

    monkeypatch.setattr(sources, "read_image", counting)
    return count


def _load(folder, state, request=None):
    log = io.StringIO()
    splits = site_splits(folder, request=request or _request(), state_dir=state, log=log)
    return splits, log.getvalue()


def _same(a, b):
    for split in SPLITS:
        np.testing.assert_array_equal(np.asarray(a[split].images), np.asarray(b[split].images))
        np.testing.assert_array_equal(a[split].labels, b[split].labels)


def test_second_message_reads_the_cache_and_decodes_nothing(tmp_path, decodes):
    folder = _folder(tmp_path / "cxr")
    first, log = _load(folder, tmp_path / "state")
    assert decodes["files"] == 24
    assert "decoding 24 images" in log and "first use of this state directory" in log
    again, log = _load(folder, tmp_path / "state")
    assert decodes["files"] == 24 and log == ""
    _same(first, again)
    assert isinstance(again["train"].images, DiskImages)
    # Only the finished cache is left: no decoded scratch array, no partial folder.
    (cache,) = (tmp_path / "state" / "images").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["meta.json"] + [f"{s}-{kind}.npy" for s in SPLITS for kind in ("images", "labels")])


def test_splits_on_disk_give_the_batches_of_the_in_memory_path(tmp_path):
    folder = _folder(tmp_path / "cxr", rgb_at=5)  # a colour image turns the whole set to RGB
    cached, _ = _load(folder, tmp_path / "state")
    loaded = sources.load(sources.discover(folder, classes=list(CLASSES)), image_size=16)
    in_memory = image_cache._in_memory(sources.discover(folder, classes=list(CLASSES)),
                                       request=_request(), log=io.StringIO())
    assert cached["train"].images.shape[1:] == (16, 16, 3) == loaded.images.images.shape[1:]
    _same(cached, in_memory)

    def batches(data):
        loader = torch.utils.data.DataLoader(
            TransformedImages(data, lambda image: {"image": torch.as_tensor(image.copy())}),
            batch_size=4)
        return [(x, y) for x, y in loader]

    for (x, y), (x2, y2) in zip(batches(cached["train"]), batches(in_memory["train"]), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("change, reason", [
    ("add", "1 file(s) added: normal/900.png"),
    ("modify", "1 file(s) changed: pneumonia/003.png"),
    ("remove", "1 file(s) removed: normal/000.png"),
    ("image_size", "image_size 16 → 24"),
    ("seed", "seed 7 → 8"),
    ("classes", "classes"),
    ("version", "made by medfed"),
])
def test_every_key_invalidates_the_cache_and_says_why(tmp_path, decodes, monkeypatch, change,
                                                      reason):
    folder = _folder(tmp_path / "cxr")
    state = tmp_path / "state"
    before, _ = _load(folder, state)
    request = _request()
    if change == "add":
        write_png(folder / "normal" / "900.png", gradient(900))
    elif change == "modify":
        write_png(folder / "pneumonia" / "003.png", gradient(300))
        os.utime(folder / "pneumonia" / "003.png", ns=(1, 1))
    elif change == "remove":
        (folder / "normal" / "000.png").unlink()
    elif change == "image_size":
        request = _request(image_size=24)
    elif change == "seed":
        request = _request(seed=8)
    elif change == "classes":
        request = _request(classes=("covid", *CLASSES))
    else:
        monkeypatch.setattr(medfed, "__version__", "0.0.1", raising=False)
    decodes["files"] = 0
    after, log = _load(folder, state, request)
    assert decodes["files"] == sum(len(s) for s in after.values())
    assert reason in log
    assert len(list((state / "images").iterdir())) == 1  # the old cache is gone
    if change == "modify":
        assert not all(np.array_equal(np.asarray(before[s].images), np.asarray(after[s].images))
                       for s in SPLITS)
    if change == "classes":  # labels are numbered by the federation's list
        assert set(np.concatenate([s.labels for s in after.values()]).tolist()) == {1, 2}


def test_full_disk_keeps_no_partial_cache_and_decodes_in_memory(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "cxr")
    state = tmp_path / "state"
    old, _ = _load(folder, state, _request(image_size=12))
    real_save = np.save

    def full(file, *args, **kwargs):
        if "test-labels" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(image_cache.np, "save", full)
    splits, log = _load(folder, state)
    assert "could not write the image cache" in log and "No space left on device" in log
    assert sum(len(s) for s in splits.values()) == 24
    assert isinstance(splits["train"].images, np.ndarray)
    # Nothing half-written remains; the previous cache is still there and still valid.
    (kept,) = (state / "images").iterdir()
    assert json.loads((kept / "meta.json").read_text())["settings"]["image_size"] == 12
    monkeypatch.setattr(image_cache.np, "save", real_save)
    again, log = _load(folder, state, _request(image_size=12))
    assert log == ""
    _same(old, again)


def test_state_directory_that_cannot_be_written_is_one_clear_error(tmp_path):
    folder = _folder(tmp_path / "cxr")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(MedfedError, match="give --state-dir a writable folder"):
        _load(folder, blocker / "state")


def test_dicom_patients_keep_their_images_in_one_split(tmp_path):
    root = tmp_path / "cr"
    for i in range(30):
        write_dicom(root / CLASSES[i % 2] / f"{i}.dcm", gradient(i), patient_id=f"P{i // 3}")
    splits, _ = _load(root, tmp_path / "state")
    loaded = sources.load(sources.discover(root, classes=list(CLASSES)), image_size=16)
    assert loaded.patients is not None
    in_memory = image_cache._in_memory(sources.discover(root, classes=list(CLASSES)),
                                       request=_request(), log=io.StringIO())
    _same(splits, in_memory)


def test_a_killed_process_leaves_nothing_that_is_used_and_its_leftovers_are_removed(tmp_path):
    folder = _folder(tmp_path / "cxr")
    images = tmp_path / "state" / "images"
    abandoned, busy = images / ".partial-killed", images / ".partial-busy"
    for partial in (abandoned, busy):
        partial.mkdir(parents=True)
        (partial / "decoded.npy").write_bytes(b"half")  # no meta.json: never read as a cache
    os.utime(abandoned / "decoded.npy", (0, 0))
    splits, _ = _load(folder, tmp_path / "state")
    assert sum(len(s) for s in splits.values()) == 24
    assert not abandoned.exists() and busy.exists()  # another process may still be writing it


def test_the_site_app_decodes_and_builds_its_model_at_its_first_message_only(
        tmp_path, decodes, medmnist_dir, monkeypatch):
    """Two training messages to medfed's real ClientApp, each as in a fresh process (nothing kept
    in memory between them), on a folder of real BreastMNIST images: the second decodes no
    image and builds no model (the head trains on the cached features as received), and it
    answers exactly as a site that builds the model does."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import medfed.client.app as client_module
    from medfed.client.site_data import load_site
    from medfed.common import messages, wire
    from medfed.common.config import Config
    from medfed.common.dataset import load_splits
    from medfed.common.model import build_model
    from medfed.common.schedule import HEAD
    from tests.commands import TINY_WEIGHTS

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    test = load_splits(medmnist_dir / "breastmnist.npz")["test"]
    for n in range(90):
        write_png(tmp_path / "breast" / CLASSES[test.labels[n]] / f"{n}.png", test.images[n])
    config = Config()
    config.data.classes, config.data.image_size = list(CLASSES), 32
    config.model.backbone, config.model.weights = "test_efficientnet", TINY_WEIGHTS
    config.train.device, config.train.local_steps = "cpu", 2
    model = build_model(config.model, num_classes=2, seed=config.seed)
    keys = wire.exchanged_keys(model, bn=config.model.bn, stage=HEAD)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"site": "hospital-a", "data-path": str(tmp_path / "breast"),
                                   "state-dir": str(tmp_path / "state")})
    built = []
    monkeypatch.setattr(client_module, "build_model",
                        lambda *args, **kwargs: built.append(1) or build_model(*args, **kwargs))

    def message(server_round: int):
        # A fresh ClientApp process remembers nothing: no decoded site, no model template.
        load_site.cache_clear()
        client_module._template.cache_clear()
        sent = messages.with_round_values(
            ConfigRecord(), {**messages.round_config(config, classes=list(CLASSES), study="s"),
                             "server-round": server_round}, lr=1e-3, stage=HEAD)
        reply = client_module.app(
            Message(content=RecordDict({messages.ARRAYS: wire.to_record(model, keys),
                                        messages.CONFIG: sent}),
                    dst_node_id=1, message_type=MessageType.TRAIN), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return reply

    message(1)
    assert decodes["files"] == 90 and len(built) == 1  # the first message decoded and built
    first_features = sorted((tmp_path / "state" / "features").glob("features-*.npy"))
    reply = message(2)
    assert decodes["files"] == 90 and len(built) == 1  # the second one neither
    # The second message found the first one's frozen features under the same names.
    assert sorted((tmp_path / "state" / "features").glob("features-*.npy")) == first_features
    assert len(first_features) == 3
    assert reply.content["metrics"][messages.WEIGHT_KEY] == len(
        image_cache._open(next((tmp_path / "state" / "images").iterdir()))["train"])

    # A site that trains the model's own classifier (as for a head that is not one linear
    # layer) sends the same update and evaluation.
    monkeypatch.setattr(wire, "linear_classifier", lambda record, num_classes: None)
    built_reply = message(2)
    assert len(built) == 2
    for key in keys:
        np.testing.assert_array_equal(reply.content["arrays"][key].numpy(),
                                      built_reply.content["arrays"][key].numpy())
    assert list(reply.content["arrays"].keys()) == list(built_reply.content["arrays"].keys()) == keys
    assert dict(reply.content["evaluation"]) == dict(built_reply.content["evaluation"])


def test_a_site_process_for_cached_features_does_not_import_timm():
    """What spares a later message 2 s: the site app's module loads no timm, albumentations or
    Opacus (each is imported where it is used)."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, medfed.client.app; print(sorted(m for m in "
         "('timm', 'torchvision', 'albumentations', 'opacus') if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_images_on_disk_read_like_the_array_they_hold(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    writer = DiskImagesWriter(tmp_path / "x.npy", count=7, shape=(5, 4, 3))
    for i in (3, 0, 6, 1, 5, 2, 4):  # any order
        writer.put(i, array[i])
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), array)  # an ordinary .npy file
    images = DiskImages(tmp_path / "x.npy")
    assert (len(images), images.shape, images.ndim) == (7, (7, 5, 4, 3), 4)
    for index in (2, -1, slice(1, 4), slice(None, None, 2), np.array([5, 0, 5]),
                  array[:, 0, 0, 0] > 128, slice(6, 2)):
        np.testing.assert_array_equal(images[index], array[index])
    np.testing.assert_array_equal(np.asarray(images), array)
    with pytest.raises(IndexError):
        images[7]
    with pytest.raises(ValueError, match="expected uint8"):
        DiskImagesWriter(tmp_path / "y.npy", count=1, shape=(2, 2)).put(0, np.zeros((2, 3), np.uint8))
