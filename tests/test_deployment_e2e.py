"""The deployment engine for real: `medfed server start` (a SuperLink with TLS and SuperNode
authentication) and one `medfed client` per hospital (a SuperNode each), all separate processes
on loopback, on real BreastMNIST split across three sites, with a tiny model.

The two studies of the `deployments` fixture run side by side, each on its own SuperLink: most of
a study's time is Flower's polling and a fresh ClientApp process per message, so on a machine with
spare cores two take little longer than one. Every process is started by that fixture and ended
in its teardown (Ctrl-C first, which medfed turns into a clean shutdown of its Flower processes;
SIGKILL only after a bounded wait); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from PIL import Image
from commands import MEDFED, TINY_WEIGHTS

from medfed.common import messages
from medfed.common.dataset import SPLITS, LabelledImages, load_splits, save_splits
from medfed.common.metrics import SCALARS
from medfed.common.flower_commands import FlowerCommandError, flwr_json, free_port
from medfed.common.errors import MedfedError
from medfed.server.certs import init_certs
from medfed.server.proxy import nginx_executable


def _nginx_missing() -> str | None:
    try:
        nginx_executable()
    except MedfedError as exc:
        return str(exc)
    return None


# `medfed server start` needs nginx in front of the SuperLink; .ci/run installs it.
pytestmark = pytest.mark.skipif(_nginx_missing() is not None, reason=str(_nginx_missing()))

SITES = ["hospital-a", "hospital-b", "hospital-c"]
FOLDER_SITE = SITES[2]
STUDY = {
    "data": {"classes": ["malignant", "normal, benign"], "image_size": 32},
    "model": {"backbone": "test_efficientnet", "weights": TINY_WEIGHTS},
    "train": {"device": "cpu"},
    "federation": {"rounds": 2, "round_timeout": 120},
}
RUN_LIMIT_S = 420
# Every metric name a site may send: its training cost and loss, its evaluation (scalars,
# confusion matrices, label histograms) and its privacy spend.
SENDABLE_METRICS = {
    messages.WEIGHT_KEY, messages.TRAIN_LOSS, messages.COMPUTE_SECONDS, messages.TRAIN_SECONDS,
    messages.PEAK_MB,
    *messages.PRIVACY_METRICS,
    *(f"{split}-{name}" for split in messages.EVALUATED_SPLITS
      for name in (*SCALARS, "loss", "confusion")),
    *(f"{split}-histogram" for split in SPLITS),
}
PARTIAL_WAIT_S = 20


class Process:
    def __init__(self, args: list[str], *, folder: Path, name: str, env: dict[str, str]):
        self.name = name
        self.stdout, self.stderr = folder / f"{name}.out", folder / f"{name}.err"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.popen = subprocess.Popen([MEDFED, *args], stdout=out, stderr=err, env=env,
                                          stdin=subprocess.DEVNULL)

    @property
    def out(self) -> str:
        return self.stdout.read_text()

    @property
    def err(self) -> str:
        return self.stderr.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout:.0f} s\n"
                        f"stdout:\n{self.out}\nstderr:\n{self.err}")

    def interrupt(self, timeout: float = 40) -> int:
        """Ctrl-C, as a user would; medfed stops its Flower processes and exits 130."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        return self.wait(timeout)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, medmnist_dir) -> Path:
    """Keys for the three hospitals and an intruder that is not in sites.yaml; each hospital's
    share of BreastMNIST as an npz with its own train/val/test; the study config."""
    root = tmp_path_factory.mktemp("federation")
    init_certs(root / "certs", server_host="fl.example.org", sites=[*SITES, "intruder"])
    (root / "sites.yaml").write_text(yaml.safe_dump(
        {"sites": {s: str(root / "certs" / s / "node-auth.pub") for s in SITES}}))
    init_certs(root / "other-certs", server_host="fl.example.org", sites=["hospital-a"])
    splits = load_splits(medmnist_dir / "breastmnist.npz")
    for i, site in enumerate(SITES):
        save_splits(root / f"{site}.npz", {k: v.subset(slice(i, None, len(SITES)))
                                           for k, v in splits.items()})
    # The last hospital holds a folder of image files, as a real one would: it decodes and
    # splits them itself, once, into its state directory.
    share = LabelledImages.pooled([s.subset(slice(2, None, len(SITES))) for s in splits.values()])
    for n, (image, label) in enumerate(zip(share.images, share.labels)):
        folder = root / FOLDER_SITE / STUDY["data"]["classes"][label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{n:04d}.png")
    (root / "study.yaml").write_text(yaml.safe_dump(STUDY))
    return root


def _server(start, federation: Path, run_dir: Path, port: int, *extra: str) -> Process:
    return start(f"server-{port}", "server", "start", "--config", str(federation / "study.yaml"),
                 "--certs", str(federation / "certs"), "--sites", str(federation / "sites.yaml"),
                 "--out", str(run_dir), "--host", "127.0.0.1", "--port", str(port), *extra)


def _client(start, federation: Path, site: str, port: int, *, name: str | None = None,
            certs: Path | None = None, data: str | None = None, timeout: float = 120) -> Process:
    name = f"{name or site}-{port}"
    data = data or (FOLDER_SITE if site == FOLDER_SITE else f"{site}.npz")
    return start(name, "client", "--site", site, "--data", str(federation / data),
                 "--superlink", f"localhost:{port}",
                 "--certs", str(certs or federation / "certs" / site),
                 "--log-file", str(federation / f"{name}.log"), "--connect-timeout", str(timeout))


def _wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _launcher(folder: Path) -> tuple[Callable[..., Process], list[Process], dict[str, str]]:
    """`start(name, *medfed_args)`, the processes it started (for `_end`), and their environment:
    offline, with SuperNodes installing the app bundle under `folder`'s own FLWR_HOME, out of
    the user's ~/.flwr."""
    env = {**os.environ, "MEDFED_OFFLINE": "1", "FLWR_HOME": str(folder / "flwr-home")}
    started: list[Process] = []

    def start(name: str, *args: str) -> Process:
        started.append(Process(list(args), folder=folder, name=name, env=env))
        return started[-1]
    return start, started, env


@pytest.fixture(scope="module")
def deployments(tmp_path_factory, federation):
    """Two studies at once, each on its own SuperLink (the runs mostly wait on Flower's polling,
    so side by side they take little longer than one): `full`, three hospitals plus a stranger
    and a site holding another federation's CA; `partial`, one hospital never comes."""
    folder = tmp_path_factory.mktemp("deployments")
    start, started, env = _launcher(folder)
    try:
        full, partial = free_port(), free_port()
        began = time.monotonic()
        yield {
            "full": {
                "run_dir": folder / "full", "port": full, "federation": federation,
                "folder": folder,
                # With DP-SGD at the sites: what leaves a deployed site is checked with it on.
                "server": _server(start, federation, folder / "full", full, "--wait-sites", "180s",
                                  "--set", "privacy.dp=sample", "--set", "privacy.epsilon=8"),
                "clients": [_client(start, federation, site, full) for site in SITES],
                "intruder": _client(start, federation, "intruder", full, data="hospital-a.npz",
                                    timeout=60),
                "wrong_ca": _client(start, federation, "hospital-a", full, name="wrong-ca",
                                    timeout=60, certs=federation / "other-certs" / "hospital-a"),
            },
            "partial": {
                "run_dir": folder / "partial",
                "server": _server(start, federation, folder / "partial", partial, "--wait-sites",
                                  f"{PARTIAL_WAIT_S}s", "--min-sites", "2",
                                  "--set", "federation.rounds=1"),
                "clients": [_client(start, federation, site, partial) for site in SITES[:2]],
                "began": began,
                "port": partial, "env": env, "certs": federation / "certs",
                "sites": federation / "sites.yaml",
            },
        }
    finally:
        _end(started)


def _end(started: list[Process]) -> None:
    """Ctrl-C to every process still running, then SIGKILL to any that outlive a bounded wait."""
    for process in started:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGINT)
    for process in started:
        try:
            process.popen.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait(timeout=10)


def test_three_hospitals_train_over_tls_and_strangers_are_turned_away(deployments):
    d = deployments["full"]
    server, run_dir = d["server"], d["run_dir"]

    assert d["wrong_ca"].wait(120) == 1, d["wrong_ca"].err
    assert "TLS" in d["wrong_ca"].err and "Traceback" not in d["wrong_ca"].err
    intruder = d["intruder"]
    assert intruder.wait(120) == 1, intruder.err
    assert "refused intruder's key" in intruder.err and "sites.yaml" in intruder.err
    assert len(intruder.err.strip().splitlines()) == 1

    _wait_for(lambda: "2 rounds" in server.out, timeout=240, what="the first round")
    _outsider_is_refused(d["port"], federation=d["federation"], run_dir=run_dir,
                         folder=d["folder"])
    status = subprocess.run([MEDFED, "status", str(run_dir)], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert "running" in status.stdout
    assert all(f"site {s}: online" in status.stdout for s in SITES), status.stdout

    assert server.wait(RUN_LIMIT_S) == 0, f"{server.out}\n{server.err}"
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["sites"]) == SITES
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    # Each site's privacy spend, round by round, and the guarantee in one sentence.
    spent = [report["rounds"][i]["privacy"] for i in (0, 1)]
    assert all(set(r) == set(SITES) for r in spent)
    assert all(0 < spent[0][s]["epsilon"] < spent[1][s]["epsilon"] <= 8.0 * 1.01 for s in SITES)
    assert "training examples are protected by (epsilon = " in report["privacy"]["guarantee"]
    assert all(set(r["train"]) == set(SITES) for r in report["rounds"])
    assert (run_dir / "global_model.pt").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert "final model from round" in server.out and "hospital-c" in server.out
    assert "round" in (run_dir / "logs" / "serverapp.log").read_text()

    for client in d["clients"]:
        assert "joined the SuperLink" in client.out
        assert "train request from the server" in client.out
        assert client.interrupt() == 130, client.err
        # Each site's audit trail: every message it ran and what left the site, by name and size.
        audit = d["federation"] / f"{client.name}.audit.jsonl"
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        trains = [e for e in entries if e["type"] == "train"]
        assert [e["round"] for e in trains] == [1, 2] and all(e["sent"]["bytes"] > 0 for e in trains)
        # What left the site: the classifier and named aggregates, never anything else.
        for entry in entries:
            assert set(entry["sent"]["tensors"]) <= {"classifier.weight", "classifier.bias"}
            assert set(entry["sent"]["metrics"]) <= SENDABLE_METRICS, entry["sent"]["metrics"]
        assert all({"epsilon", "delta", "steps"} <= set(e["sent"]["metrics"]) for e in trains)
        site = client.name.rsplit("-", 1)[0]  # "<site>-<port>"
        state = d["federation"] / f"medfed-state-{site}"
        assert list((state / "privacy").glob("*.json"))
        if site == FOLDER_SITE:
            # Its folder was decoded by the first message only; later ones read the cache.
            (cache,) = (state / "images").iterdir()
            assert (cache / "meta.json").is_file()
            log = (d["federation"] / f"{client.name}.log").read_text()
            assert log.count(" once into ") == 1, log
        assert not any("refused" in e or "error" in e for e in entries)
        # How long each message took at the site, from its ClientApp process's start.
        assert all(0 < e["seconds"] < RUN_LIMIT_S for e in entries)
        shown = subprocess.run([MEDFED, "status", str(audit)], capture_output=True, text=True,
                               timeout=60)
        assert shown.returncode == 0 and "train round 2: sent" in shown.stdout, shown


def test_a_site_that_never_comes_is_left_out_on_time(deployments):
    d = deployments["partial"]
    server = d["server"]
    assert server.wait(RUN_LIMIT_S) == 0, f"{server.out}\n{server.err}"
    assert "hospital-c" in server.out  # named as missing
    report = json.loads((d["run_dir"] / "report.json").read_text())
    assert sorted(report["sites"]) == SITES[:2]
    assert time.monotonic() - d["began"] < RUN_LIMIT_S


@pytest.mark.slow
def test_a_finished_study_resumes_for_more_rounds(deployments):
    """The SuperLink's database outlives it: a resumed study finds its sites registered, the
    SuperNodes that kept running reconnect by themselves, and the ServerApp goes on from its
    checkpoint."""
    d = deployments["partial"]
    assert d["server"].wait(RUN_LIMIT_S) == 0
    resumed = Process(["server", "start", "--resume", str(d["run_dir"]), "--set",
                       "federation.rounds=2", "--sites", str(d["sites"]), "--certs", str(d["certs"]),
                       "--wait-sites", "60s", "--min-sites", "2", "--host", "127.0.0.1",
                       "--port", str(d["port"])],
                      folder=d["run_dir"].parent, name="resumed", env=d["env"])
    try:
        assert resumed.wait(RUN_LIMIT_S) == 0, f"{resumed.out}\n{resumed.err}"
    finally:
        resumed.interrupt()
    assert "registered already" in resumed.out and "resuming after round 1" in resumed.out
    report = json.loads((d["run_dir"] / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]


DYING_SITE = SITES[1]
# Above the 60 s in which the SuperLink gives up on a node that stopped (two missed heartbeats),
# and loose enough for a loaded machine: the dead site costs one round at most that long.
ROUND_TIMEOUT_S = 90
DIES_LIMIT_S = 720


@pytest.mark.slow
def test_a_site_that_dies_mid_study_is_named_and_the_study_finishes_without_it(federation,
                                                                               tmp_path):
    """SIGKILL of one hospital's `medfed client` once its first update is sent: nothing of that
    site keeps running, each later round goes on with the other two (min-sites 2) after at most
    `round_timeout`, and the report names the hospital, not its node, as missing from them."""
    from test_faults import _commands, _kill_all, _wait_gone

    from medfed.common.processes import descendants

    start, started, _ = _launcher(tmp_path)

    port, run_dir, tree = free_port(), tmp_path / "study", {}
    began = time.monotonic()
    try:
        server = _server(start, federation, run_dir, port, "--wait-sites", "180s",
                         "--min-sites", "2", "--set", "federation.rounds=3",
                         "--set", f"federation.round_timeout={ROUND_TIMEOUT_S}")
        clients = {site: _client(start, federation, site, port) for site in SITES}
        dying = clients[DYING_SITE]
        audit = federation / f"{dying.name}.audit.jsonl"
        _wait_for(lambda: audit.is_file() and '"type": "train"' in audit.read_text(),
                  timeout=RUN_LIMIT_S, what=f"{DYING_SITE}'s first training reply")
        tree = descendants(dying.popen.pid)
        assert "flower-supernode" in " ".join(_commands(tree)), _commands(tree)
        dying.popen.kill()
        dying.popen.wait(timeout=10)
        left = _wait_gone(tree, timeout=20)
        assert not left, f"left running after kill -9 of medfed client: {_commands(left)}"

        assert server.wait(DIES_LIMIT_S) == 0, f"{server.out}\n{server.err}"
    finally:
        _end(started)
        _kill_all(tree)
    assert time.monotonic() - began < DIES_LIMIT_S

    report = json.loads((run_dir / "report.json").read_text())
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    living = [s for s in SITES if s != DYING_SITE]
    for number in (2, 3):
        # (A living site that misses a round on a loaded machine would be named too.)
        assert DYING_SITE in rounds[number]["missing"], rounds[number]
        assert rounds[number]["train"] and DYING_SITE not in rounds[number]["train"]
    assert set(report["sites"]) <= set(living)  # the final model, evaluated where it can be
    failures = [f for r in report["rounds"] for f in r["failures"]] + report["final"]["failures"]
    assert not any(f.startswith("node-") for f in failures), failures
    markdown = (run_dir / "report.md").read_text()
    assert markdown.count(DYING_SITE) >= 2, markdown  # missing from rounds 2 and 3
    assert DYING_SITE in server.out


def _outsider_is_refused(port: int, *, federation: Path, run_dir: Path, folder: Path) -> None:
    """An outsider who holds only the public ca.crt and reaches the sites' port, with Flower's own
    CLI: it can neither list runs or nodes, nor submit an app, nor register a node key; the
    Control and Runtime APIs answer 403 at nginx, and the SuperLink itself is on loopback only."""
    ca = federation / "certs" / "ca.crt"
    home = folder / "outsider-flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "public"\n\n[superlink.public]\naddress = "localhost:{port}"\n'
        f'root-certificates = "{ca}"\n')
    attempts = {
        "list runs": ["ls", "public"],
        "list nodes": ["supernode", "ls", "public"],
        "register a node": ["supernode", "register",
                            str(federation / "certs" / "intruder" / "node-auth.pub"), "public"],
        "submit an app": ["run", str(run_dir / "flower-app"), "public"],
    }
    for what, args in attempts.items():
        with pytest.raises(FlowerCommandError) as refused:
            flwr_json(args, flwr_home=home, timeout=60)
        assert "403" in str(refused.value) or "Forbidden" in str(refused.value), (what, refused.value)

    context = ssl.create_default_context(cafile=str(ca))
    for path in ("/v1/control/list-runs", "/v1/runtime/pull-messages", "/docs", "/openapi.json"):
        request = urllib.request.Request(f"https://localhost:{port}{path}", data=b"",
                                         method="POST" if path.startswith("/v1") else "GET")
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10, context=context)
        assert answer.value.code == 403, path
    with urllib.request.urlopen(f"https://localhost:{port}/health", timeout=10,
                                context=context) as health:
        assert health.status == 200

    # The SuperLink's own port, which serves all three APIs, listens on loopback only.
    link = tomllib.loads((run_dir / "flwr-home" / "config.toml").read_text())
    host, link_port = link["superlink"]["medfed"]["address"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(link_port) != port
    outward = [a for a in {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None,
                                                               socket.AF_INET)}
               if not a.startswith("127.")]
    for address in outward:
        with pytest.raises(OSError), socket.create_connection((address, int(link_port)), timeout=3):
            pass


# What SecAgg+ sends from a site, in its config record: two public keys, the key shares
# encrypted for the other sites, the masked update, and at the end the shares for unmasking.
SECAGG_SENT = {f"{RECORD_KEY_CONFIGS}.{key}" for key in (
    Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS, Key.SHARE_LIST)}


@pytest.mark.slow
def test_three_hospitals_train_under_secure_aggregation(federation, tmp_path):
    """`privacy.secagg` in a real deployment: each hospital declares its training-set size once,
    then every round's updates travel masked (SecAgg+'s four exchanges), so no site's audit log
    shows a tensor leaving it during training, only SecAgg+'s keys, shares and masked update."""
    start, started, _ = _launcher(tmp_path)

    port, run_dir = free_port(), tmp_path / "study"
    try:
        server = _server(start, federation, run_dir, port, "--wait-sites", "180s",
                         "--set", "privacy.secagg=true")
        clients = [_client(start, federation, site, port, name=f"secagg-{site}") for site in SITES]
        assert server.wait(RUN_LIMIT_S) == 0, f"{server.out}\n{server.err}"
        for client in clients:
            assert client.interrupt() == 130, client.err
    finally:
        _end(started)
    assert "under secure aggregation (SecAgg+)" in server.out
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(set(r["train"]) == set(SITES) and not r["failures"] for r in report["rounds"])
    assert sorted(report["sites"]) == SITES
    for client in clients:
        entries = [json.loads(line) for line in
                   (federation / f"{client.name}.audit.jsonl").read_text().splitlines()]
        trains = [e for e in entries if e["type"] == "train"]
        assert len(trains) == 2 * 4, trains  # SecAgg+'s four exchanges per round
        assert not any(e["sent"]["tensors"] for e in entries), entries
        masked = [e for e in trains
                  if f"{RECORD_KEY_CONFIGS}.{Key.MASKED_PARAMETERS}" in e["sent"]["binary"]]
        assert [e["round"] for e in masked] == [1, 2] and all(e["sent"]["bytes"] for e in masked)
        # Beside medfed's own metrics, the legacy fit result's example count SecAgg+ weights by.
        assert all(set(e["sent"]["metrics"]) <= SENDABLE_METRICS | {"num_examples"}
                   for e in entries), entries
        assert all(set(e["sent"]["binary"]) <= SECAGG_SENT for e in entries), entries
