"""`medfed server start` and `medfed client` refuse bad input with one error line (exit 2) before
starting anything, and a client that finds no server gives up in time (exit 1)."""

from __future__ import annotations

import socket
import subprocess
import time

import numpy as np
import pytest
import yaml
from commands import MEDFED

from medfed.common.dataset import LabelledImages, load_splits, save_splits
from medfed.common.errors import MedfedError
from medfed.common.flower_commands import free_port
from medfed.server.certs import init_certs
from medfed.server.study import parse_duration

STUDY = {"data": {"classes": ["normal", "pneumonia"]}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment-cli")
    init_certs(root / "certs", server_host="fl.example.org", sites=["hospital-a", "hospital-b"])
    (root / "study.yaml").write_text(yaml.safe_dump(STUDY))
    rng = np.random.default_rng(0)
    split = LabelledImages(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 2)
    save_splits(root / "site.npz", {"train": split, "val": split, "test": split})
    save_splits(root / "no-test.npz", {"train": split, "val": split})
    return root


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _one_error_line(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400),
                                           ("0", 0)])
def test_durations(text, seconds):
    assert parse_duration(text, option="--wait-sites") == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "m", ""])
def test_bad_durations(text):
    with pytest.raises(MedfedError, match="--wait-sites"):
        parse_duration(text, option="--wait-sites")


def test_bad_server_input_is_one_error_line(setup, tmp_path):
    study, certs = str(setup / "study.yaml"), str(setup / "certs")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "report.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    cases = [
        ([], "--config is required"),
        (["--config", study, "--insecure", "--certs", certs], "leave out --certs"),
        (["--config", study], "--certs is required"),
        (["--config", study, "--certs", str(tmp_path)], "lacks ca.crt"),
        (["--config", study, "--certs", certs, "--set", "data.classes=normal"], "data.classes"),
        (["--config", study, "--certs", certs, "--set", "federation.rounds=0"], "federation.rounds"),
        (["--config", study, "--certs", certs, "--min-sites", "3"], "--min-sites 3"),
        (["--config", study, "--certs", certs, "--wait-sites", "soon"], "--wait-sites"),
        (["--config", study, "--certs", certs, "--out", str(tmp_path / "taken")], "already exists"),
        (["--config", study, "--certs", certs, "--out", str(tmp_path / "notes.txt")], "existing file"),
        (["--resume", str(tmp_path / "taken")], "no config.yaml"),
        (["--resume", str(tmp_path / "taken"), "--config", study], "leave out --config"),
    ]
    for args, message in cases:
        out = [] if "--out" in args or "--resume" in args else ["--out", str(tmp_path / "run")]
        _one_error_line(_run("server", "start", *args, *out, "--port", str(free_port())), 2, message)
        assert not (tmp_path / "run").exists()


def test_port_in_use_is_named(setup, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("server", "start", "--config", str(setup / "study.yaml"), "--certs",
                      str(setup / "certs"), "--out", str(tmp_path / "run"), "--host", "127.0.0.1",
                      "--port", str(port))
    _one_error_line(result, 2, f"port {port} on 127.0.0.1 is already in use")


def test_bad_client_input_is_one_error_line(setup, tmp_path):
    site_certs = str(setup / "certs" / "hospital-a")
    images = tmp_path / "images" / "normal"
    images.mkdir(parents=True)
    (images / "x.png").write_text("not an image")
    (tmp_path / "a-file").write_text("")
    cases = [
        (["--data", str(setup / "site.npz"), "--superlink", "https://fl.example.org:9092",
          "--certs", site_certs], "HOST:PORT"),
        (["--data", str(setup / "site.npz"), "--superlink", "fl.example.org"], "HOST:PORT"),
        (["--data", str(setup / "site.npz"), "--superlink", "fl.example.org:9092"], "--certs is required"),
        (["--data", str(setup / "site.npz"), "--superlink", "fl.example.org:9092",
          "--certs", str(setup / "certs")], "lacks node-auth.key"),
        (["--data", str(tmp_path / "nowhere"), "--superlink", "fl.example.org:9092",
          "--certs", site_certs], "does not exist"),
        (["--data", str(setup / "no-test.npz"), "--superlink", "fl.example.org:9092",
          "--certs", site_certs], "no test split"),
        (["--data", str(tmp_path / "images"), "--superlink", "fl.example.org:9092",
          "--certs", site_certs], "cannot be used as it is"),
        (["--data", str(setup / "site.npz"), "--superlink", "fl.example.org:9092",
          "--certs", site_certs, "--state-dir", str(tmp_path / "a-file" / "state")],
         "cannot be written"),
    ]
    for args, message in cases:
        _one_error_line(_run("client", "--site", "hospital-a", *args,
                             "--log-file", str(tmp_path / "a.log")), 2, message)
        assert not (tmp_path / "a.log").exists()  # refused before any SuperNode started


def test_client_without_a_server_gives_up_in_time(setup, tmp_path):
    started = time.monotonic()
    result = _run("client", "--site", "hospital-a", "--data", str(setup / "site.npz"),
                  "--superlink", f"127.0.0.1:{free_port()}", "--certs", str(setup / "certs" / "hospital-a"),
                  "--log-file", str(tmp_path / "a.log"), "--connect-timeout", "5")
    _one_error_line(result, 1, "no answer from a SuperLink at 127.0.0.1:")
    assert "within 5 s" in result.stderr
    assert time.monotonic() - started < 30


def test_client_started_with_sigint_ignored_still_stops_on_sigint(tmp_path, medmnist_dir):
    """A shell without job control (`medfed client &`, nohup, CI runners) starts it with SIGINT
    ignored; Python would leave it so, and Ctrl-C or `kill -INT` would never stop the site."""
    import signal
    import time

    splits = load_splits(medmnist_dir / "breastmnist.npz")
    save_splits(tmp_path / "site.npz", {k: v.subset(slice(0, 30)) for k, v in splits.items()})
    site = subprocess.Popen(
        [MEDFED, "client", "--site", "hospital-a", "--data", str(tmp_path / "site.npz"),
         "--superlink", "127.0.0.1:9", "--insecure", "--log-file", str(tmp_path / "site.log"),
         "--connect-timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while not (tmp_path / "site.log").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    site.send_signal(signal.SIGINT)
    output = site.communicate(timeout=40)[0]
    assert site.returncode == 130, output
