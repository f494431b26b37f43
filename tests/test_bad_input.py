"""Bad input that used to end in a traceback, and folders medfed used to empty without a word
(issue 10, "Bad input that still ends in a traceback" and "Data lost without a word").

Each case is run as a user runs it (`medfed simulate` in a subprocess) where it fails before
training, and asserts one line on stderr, exit 2 and no traceback; the checkpoint's full disk is
tested on `save_checkpoint` itself, with a real ENOSPC from /dev/full.
"""

from __future__ import annotations

import errno
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from commands import TINY, medfed

from medfed.client.site_data import load_site
from medfed.common.config import Config
from medfed.common.config_loading import load_yaml
from medfed.common.dataset import load_splits
from medfed.common.errors import MedfedError, few
from medfed.common.files import claim_run_dir
from medfed.server.certs import read_sites
from medfed.server.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint



def simulate(data_dir: Path, out: Path, *extra: str, sites: str = "2"):
    """`medfed simulate` on the small BreastMNIST-shaped file, as tiny as a run gets; every case
    here fails before any training."""
    return medfed("simulate", "--dataset", "breastmnist", "--sites", sites, "--compare", "federated",
                  "--rounds", "1", *TINY, "--out", str(out), *extra, data_dir=data_dir, timeout=300)


def one_line_error(result, *, code: int = 2) -> str:
    """The single `error: ...` line a user sees; fails on a traceback or anything more."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def medmnist_layout(folder: Path, *, labels: dict[str, np.ndarray] | None = None,
                    name: str = "breastmnist.npz", sizes=(200, 40, 40)) -> Path:
    """A small BreastMNIST-shaped npz (28x28 gray, 2 classes) written where --data-dir looks."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        # Few grey levels: deflate codes them with Huffman tables, as it does real scans.
        arrays[f"{split}_images"] = (rng.integers(0, 8, size=(n, 28, 28)) * 32).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(-1, 1)
    for split, values in (labels or {}).items():
        arrays[f"{split}_labels"] = values.reshape(-1, 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    medmnist_layout(folder)
    return folder


# 1. A binary file given as --config -------------------------------------------------------------

def test_binary_config_file_is_one_line(tmp_path):
    config = tmp_path / "model.pt"
    torch.save({"weights": torch.arange(1000)}, config)  # what a user might pass by mistake
    line = one_line_error(medfed("simulate", "--config", str(config), timeout=120))
    assert f"config file {config} is not a YAML text file" in line


def test_broken_yaml_config_is_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("federation:\n  rounds: [3\n")
    line = one_line_error(medfed("simulate", "--config", str(config), timeout=120))
    assert f"config file {config} is not valid YAML" in line and "line " in line


def test_binary_sites_file_is_refused(tmp_path):
    sites = tmp_path / "sites.yaml"
    sites.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(MedfedError, match="is not a YAML text file") as raised:
        read_sites(sites)
    assert "\n" not in str(raised.value)
    with pytest.raises(MedfedError, match="not a YAML text file"):
        load_yaml(sites)


# 2. An npz whose bytes are damaged mid-file -----------------------------------------------------

def corrupt_mid_stream(path: Path) -> None:
    """Overwrite bytes in the middle of train_images' deflate stream so that zlib itself fails
    (before zipfile's CRC check), which numpy lets through as zlib.error. Where that happens
    depends on zlib's output, so nearby spots are tried until one does."""
    with zipfile.ZipFile(path) as bundle:
        info = bundle.getinfo("train_images.npy")
    source = path.read_bytes()
    # The member's data starts after its 30-byte local header, name and extra field.
    name_len, extra_len = np.frombuffer(source[info.header_offset + 26:info.header_offset + 30],
                                        dtype="<u2")
    middle = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size // 2
    for shift in range(0, 4096, 7):
        raw = bytearray(source)
        raw[middle + shift:middle + shift + 8] = b"\xff\x00" * 4
        path.write_bytes(bytes(raw))
        try:
            with np.load(path) as npz:
                npz["train_images"]
        except zlib.error:
            return
        except Exception:
            continue
    raise AssertionError("no corruption found that zlib itself reports")


def test_npz_corrupted_mid_file_is_the_documented_data_error(tmp_path):
    path = medmnist_layout(tmp_path / "data")
    corrupt_mid_stream(path)  # np.load then raises zlib.error, which used to escape
    with pytest.raises(MedfedError, match="is not a readable MedMNIST npz"):
        load_splits(path)
    line = one_line_error(simulate(tmp_path / "data", tmp_path / "run"))
    assert f"{path} is not a readable MedMNIST npz (zlib.error: Error -3" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.incomplete").exists()


def test_random_damage_to_an_npz_is_always_the_documented_error(tmp_path):
    """Flipped, overwritten and cut bytes anywhere: MedfedError or a clean read, nothing else."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, train_images=np.zeros((20, 8, 8), np.uint8),
                        train_labels=np.ones((20, 1), np.uint8))
    source = buffer.getvalue()
    rng = np.random.default_rng(1)
    path = tmp_path / "damaged.npz"
    for trial in range(400):
        damaged = bytearray(source)
        at = int(rng.integers(len(damaged)))
        if trial % 3 == 2:
            damaged = damaged[:at]
        else:
            width = int(rng.choice([1, 4, 16]))
            damaged[at:at + width] = rng.integers(0, 256, size=len(damaged[at:at + width]),
                                                  dtype=np.uint8).tobytes()
        path.write_bytes(bytes(damaged))
        try:
            load_splits(path)
        except MedfedError as exc:
            assert "\n" not in str(exc)


# 3. Labels outside the dataset's classes --------------------------------------------------------

@pytest.mark.parametrize("split,bad,expected", [
    ("train", 7, "train_labels has 7 (3 images); labels must be 0 to 1 (2 classes of breastmnist)"),
    ("test", -1, "test_labels has -1 (3 images); labels must be 0 to 1 (2 classes of breastmnist)"),
], ids=["seven-in-two-classes", "minus-one"])
def test_labels_out_of_range_are_refused_before_training(split, bad, expected, tmp_path):
    n = {"train": 200, "test": 40}[split]
    labels = (np.arange(n) % 2).astype(np.int16)
    labels[[3, 10, 17]] = bad
    path = medmnist_layout(tmp_path / "data", labels={split: labels})
    result = simulate(tmp_path / "data", tmp_path / "run")
    line = one_line_error(result)
    assert f"{path}: labels out of range: {expected}" in line
    assert "round" not in result.stdout  # refused before any training
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.incomplete").exists()


def test_a_site_npz_with_labels_outside_the_federation_classes_is_refused(tmp_path):
    labels = (np.arange(200) % 3).astype(np.uint8)  # class 2 in a 2-class federation
    path = medmnist_layout(tmp_path, labels={"train": labels}, name="site.npz")
    with pytest.raises(MedfedError, match=r"train_labels has 2 \(66 images\); labels must be 0 to 1"):
        load_site.__wrapped__(path, config_json=Config().to_json(), classes=("a", "b"), site="h",
                              state=tmp_path / "state")


def test_negative_labels_are_refused_even_without_a_class_count(tmp_path):
    path = medmnist_layout(tmp_path, labels={"val": -np.ones(40, np.int8)}, name="n.npz")
    with pytest.raises(MedfedError, match=r"val_labels has -1 \(40 images\); labels must be 0 or more"):
        load_splits(path)


def test_fractional_labels_are_refused(tmp_path):
    path = medmnist_layout(tmp_path, labels={"val": np.linspace(0, 1, 40)}, name="f.npz")
    with pytest.raises(MedfedError, match="val_labels must be whole class numbers"):
        load_splits(path)


# 4. --out that is a file, under a file, or not writable ---------------------------------------

def test_out_that_is_an_existing_file_is_refused(tmp_path, good_data):
    out = tmp_path / "results.csv"
    out.write_text("a user's file\n")
    line = one_line_error(simulate(good_data, out))
    assert f"--out {out} is an existing file" in line
    assert out.read_text() == "a user's file\n"
    assert not (tmp_path / "results.csv.incomplete").exists()


def test_out_under_a_file_is_refused(tmp_path, good_data):
    (tmp_path / "notes.txt").write_text("kept\n")
    out = tmp_path / "notes.txt" / "run"
    line = one_line_error(simulate(good_data, out))
    assert f"--out {out} cannot be created: {tmp_path / 'notes.txt'} is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "kept\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check "
                                              "cannot fail there (the under-a-file case covers it)")
def test_out_in_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(MedfedError, match="cannot write the run directory .*Permission denied"):
            claim_run_dir(folder / "run")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_out_where_the_folder_cannot_be_made_is_refused_even_as_root(tmp_path, monkeypatch):
    """What a read-only folder does to a non-root user, simulated (root ignores the mode bits)."""
    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(MedfedError) as raised:
        claim_run_dir(tmp_path / "run")
    assert str(raised.value) == (f"cannot write the run directory {tmp_path / 'run.incomplete'} "
                                 f"(Permission denied); choose another --out")


# 5. A full disk while the checkpoint is written -----------------------------------------------

def checkpoint(run_dir: Path, server_round: int) -> None:
    save_checkpoint(run_dir, server_round=server_round,
                    arrays={"w": np.full(1000, server_round, np.float32)},
                    strategy_state={"round": server_round}, config_json=Config().to_json())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (always ENOSPC)")
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    checkpoint(tmp_path, 1)
    partial = tmp_path / f".{CHECKPOINT}.partial"
    # The next write lands on a device that is always full: the kernel's own ENOSPC.
    partial.symlink_to("/dev/full")
    with pytest.raises(MedfedError) as raised:
        checkpoint(tmp_path, 2)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400
    assert f"cannot write the round-2 checkpoint {tmp_path / CHECKPOINT}" in message
    assert "No space left on device" in message and "kept unchanged" in message
    assert not partial.exists() and not partial.is_symlink()
    state = load_checkpoint(tmp_path, config_json=Config().to_json())
    assert state["round"] == 1 and state["arrays"]["w"][0] == 1


def test_full_disk_reported_late_by_fsync_leaves_no_partial(tmp_path, monkeypatch):
    """Filesystems that allocate late (NFS, ext4 delalloc) report ENOSPC at fsync."""
    checkpoint(tmp_path, 1)
    import medfed.common.files as files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(MedfedError, match="No space left on device"):
        checkpoint(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    assert load_checkpoint(tmp_path, config_json=Config().to_json())["round"] == 1


def test_first_checkpoint_on_a_full_disk_says_there_is_none(tmp_path):
    (tmp_path / f".{CHECKPOINT}.partial").symlink_to("/dev/full")
    with pytest.raises(MedfedError, match="no earlier checkpoint exists"):
        checkpoint(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


FULL_FROM_ROUND_2 = """
import sys
from pathlib import Path

import medfed.server.app as server_app
from medfed.cli.main import app

save = server_app.save_checkpoint


def full_from_round_2(run_dir, *, server_round, **kwargs):
    if server_round == 2:  # from here on the checkpoint lands on a full device
        (Path(run_dir) / ".checkpoint.pt.partial").symlink_to("/dev/full")
    return save(run_dir, server_round=server_round, **kwargs)


server_app.save_checkpoint = full_from_round_2
sys.argv[0] = "medfed"
app()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (always ENOSPC)")
def test_full_disk_mid_simulation_is_one_line_and_keeps_round_one(tmp_path, medmnist_dir):
    """The whole way: the ServerApp's error crosses Flower's simulation thread to the CLI."""
    import subprocess
    import sys

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", FULL_FROM_ROUND_2, "simulate", "--dataset", "breastmnist",
         "--sites", "2", "--rounds", "3", "--compare", "federated", *TINY, "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "MEDFED_OFFLINE": "1", "MEDFED_DATA_DIR": str(medmnist_dir)})
    line = one_line_error(result)
    federated = tmp_path / "run.incomplete" / "seed-0" / "federated"
    assert f"cannot write the round-2 checkpoint {federated / CHECKPOINT} (No space left" in line
    assert sorted(p.name for p in federated.iterdir()) == [CHECKPOINT]
    state = torch.load(federated / CHECKPOINT, map_location="cpu", weights_only=False)
    assert state["round"] == 1


# 6. Too many sites ------------------------------------------------------------------------------

def test_ten_thousand_sites_is_one_short_line(tmp_path, good_data):
    line = one_line_error(simulate(good_data, tmp_path / "run", sites="10000"))
    assert len(line) < 300, line
    assert "10,000 sites leave too few examples" in line and "use at most 6 --sites" in line


def test_long_lists_in_messages_name_a_few_and_count_the_rest():
    assert few([f"site-{i}" for i in range(10_000)]) == (
        "site-0, site-1, site-2, site-3, site-4 and 9,995 more")
    assert few(["a", "b"]) == "a, b"
    assert few(list("abcdef")) == "a, b, c, d, e, f"  # "and 1 more" would be no shorter


# 7. Never delete what is in <out>.incomplete/ ---------------------------------------------------

def test_leftover_incomplete_folder_is_refused_not_deleted(tmp_path, good_data):
    out = tmp_path / "run"
    staging = tmp_path / "run.incomplete"
    (staging / "seed-0").mkdir(parents=True)
    (staging / "my-notes.txt").write_text("do not lose this\n")
    line = one_line_error(simulate(good_data, out))
    assert f"{staging} already holds 2 entries (my-notes.txt, seed-0)" in line
    assert "will not delete it" in line and "remove it yourself, or choose another --out" in line
    assert (staging / "my-notes.txt").read_text() == "do not lose this\n"
    assert (staging / "seed-0").is_dir() and not out.exists()


def test_empty_incomplete_folder_is_reused(tmp_path):
    staging = tmp_path / "run.incomplete"
    staging.mkdir()
    assert claim_run_dir(tmp_path / "run") == staging and staging.is_dir()
    assert list(staging.iterdir()) == []
