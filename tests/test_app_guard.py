"""A site runs medfed's ClientApp and nothing else: the bundle check on bundles Flower itself
builds, and a foreign app submitted to a real SuperLink refused by a real `medfed client`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from commands import MEDFED
from flwr.cli.build import build_fab_from_disk

from medfed.client.app_guard import REFUSED, ForeignApp, check_bundle
from medfed.common.dataset import load_splits, save_splits
from medfed.common.flower_commands import (
    FlowerCommandError, executable, flower_env, flwr_json, free_port,
)
from medfed.common.processes import Child
from medfed.server.flower_app import write_app

FOREIGN_SERVER = '''
import json, pathlib, time
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(content=RecordDict({"config": ConfigRecord({"hello": 1})}),
                        message_type=MessageType.QUERY, dst_node_id=node)
                for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=60)
    answers = [r.error.reason if r.has_error() else "ran" for r in replies]
    pathlib.Path(context.run_config["answers"]).write_text(json.dumps(answers))
'''
FOREIGN_CLIENT = '''
import pathlib
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(message: Message, context: Context) -> Message:
    pathlib.Path(context.run_config["marker"]).write_text("foreign code ran at the site")
    return Message(content=RecordDict(), reply_to=message)
'''


def _foreign_app(folder: Path, *, components: dict[str, str], package: str,
                 config: dict[str, str] | None = None) -> Path:
    app = folder / "app"
    (app / package).mkdir(parents=True)
    (app / package / "__init__.py").write_text("")
    (app / package / "server.py").write_text(FOREIGN_SERVER)
    (app / package / "client.py").write_text(FOREIGN_CLIENT)
    settings = "".join(f'{k} = "{v}"\n' for k, v in (config or {}).items())
    (app / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "foreign"
        version = "1.0.0"

        [tool.flwr.app]
        publisher = "someone"

        [tool.flwr.app.components]
        serverapp = "{components['serverapp']}"
        clientapp = "{components['clientapp']}"

        [tool.flwr.app.config]
        """) + settings)
    return app


def _check(bundle: bytes) -> None:
    check_bundle(bundle, declared_hash=hashlib.sha256(bundle).hexdigest())


def test_the_study_bundle_medfed_server_start_writes_passes(tmp_path):
    study = SimpleNamespace(run_dir=tmp_path, certs=None, resume=False, min_sites=2, wait_s=60.0,
                            sites={"hospital-a": None, "hospital-b": None})
    _check(build_fab_from_disk(write_app(study)))


@pytest.mark.parametrize("components, package, reason", [
    ({"serverapp": "foreign.server:app", "clientapp": "foreign.client:app"}, "foreign",
     "carries files of its own"),
    # medfed's own component names, with a medfed/ folder that would shadow the installed one.
    ({"serverapp": "medfed.server.app:app", "clientapp": "medfed.client.app:app"}, "medfed",
     "carries files of its own"),
])
def test_a_bundle_carrying_code_is_refused(tmp_path, components, package, reason):
    with pytest.raises(ForeignApp, match=reason):
        _check(build_fab_from_disk(_foreign_app(tmp_path, components=components, package=package)))


def test_a_bundle_naming_another_clientapp_is_refused(tmp_path):
    app = _foreign_app(tmp_path, components={"serverapp": "medfed.server.app:app",
                                             "clientapp": "os:system"}, package="unused")
    for path in (app / "unused").iterdir():
        path.unlink()
    (app / "unused").rmdir()
    with pytest.raises(ForeignApp, match="not medfed's"):
        _check(build_fab_from_disk(app))


def test_a_bundle_whose_hash_differs_from_the_declared_one_is_refused(tmp_path):
    study = SimpleNamespace(run_dir=tmp_path, certs=None, resume=False, min_sites=1, wait_s=1.0, sites={"a": None})
    bundle = build_fab_from_disk(write_app(study))
    with pytest.raises(ForeignApp, match="not the declared"):
        check_bundle(bundle, declared_hash="0" * 64)
    with pytest.raises(ForeignApp, match="not a readable Flower app"):
        _check(b"not a zip file")


def test_a_site_refuses_a_foreign_app_before_any_of_its_code_runs(tmp_path, medmnist_dir):
    """The coordinator (or whoever controls it) submits its own app with Flower's CLI; the
    `medfed client` site answers with an error naming the refusal, and the app's ClientApp never
    ran there. Plaintext on loopback: the check does not depend on TLS."""
    splits = load_splits(medmnist_dir / "breastmnist.npz")
    save_splits(tmp_path / "site.npz", {k: v.subset(slice(0, 30)) for k, v in splits.items()})
    marker, answers = tmp_path / "pwned.txt", tmp_path / "answers.json"
    app = _foreign_app(tmp_path, components={"serverapp": "foreign.server:app",
                                             "clientapp": "foreign.client:app"}, package="foreign",
                       config={"marker": str(marker), "answers": str(answers)})
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f'insecure = true\n')
    env = flower_env(FLWR_HOME=str(home))
    superlink = Child([executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                       "--port", str(port), "--disable-runtime-dependency-installation"],
                      log=tmp_path / "superlink.log", env=env)
    site = subprocess.Popen([MEDFED, "client", "--site", "hospital-a", "--data",
                             str(tmp_path / "site.npz"), "--superlink", f"127.0.0.1:{port}",
                             "--insecure", "--log-file", str(tmp_path / "site.log"),
                             "--connect-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "FLWR_HOME": str(tmp_path / "site-home"),
                                 "MEDFED_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 60
        while "run-id" not in (submitted := _try_run(app, home)):
            assert time.monotonic() < deadline, submitted
            time.sleep(1)
        deadline = time.monotonic() + 120
        while not answers.exists():
            assert time.monotonic() < deadline, (tmp_path / "site.log").read_text()[-3000:]
            assert superlink.running() and site.poll() is None
            time.sleep(1)
    finally:
        site.send_signal(signal.SIGINT)
        output = site.communicate(timeout=40)[0]
        superlink.stop(grace=10)
    replies = json.loads(answers.read_text())
    assert len(replies) == 1 and REFUSED in replies[0] and "carries files of its own" in replies[0]
    assert not marker.exists()
    assert REFUSED in output, output
    # The site's own audit trail names the refused run and its bundle, readable with `medfed status`.
    (entry,) = [json.loads(line) for line in (tmp_path / "site.audit.jsonl").read_text().splitlines()]
    assert entry["type"] == "query" and "carries files of its own" in entry["refused"]
    shown = subprocess.run([MEDFED, "status", str(tmp_path / "site.audit.jsonl")],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "query: REFUSED" in shown.stdout, shown


def _try_run(app: Path, home: Path) -> dict:
    try:
        return flwr_json(["run", str(app), "local"], flwr_home=home, timeout=60)
    except FlowerCommandError as exc:  # the SuperLink may not answer yet
        return {"error": str(exc)}
