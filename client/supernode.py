"""`medfed client`: this hospital's SuperNode, started by medfed and watched until Ctrl-C.

The site's data is checked first (nothing is sent anywhere for that), then `flower-supernode`
connects to the SuperLink over TLS, authenticated by the site's key pair from
`medfed certs init`, and tells the medfed ClientApp where the data is through
`--node-config 'site=... data-path=...'`. Connecting is bounded: a wrong address, a certificate
that does not verify or a key the SuperLink does not know ends in one error line, not a hang.
Every message runs through client/app_guard.py, which refuses any run whose app is not medfed's.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from medfed.client.app_guard import REFUSED as FOREIGN_APP
from medfed.client.audit import AUDIT_ENV
from medfed.client.data_check import check
from medfed.common.dataset import SPLITS, load_splits
from medfed.common.errors import MedfedError
from medfed.common.flower_commands import check_tls_folder, executable, flower_env, free_port
from medfed.common.interrupts import shielded
from medfed.common.processes import Child, Follower
from medfed.common.sources import is_collection

# The site folder as `medfed certs init` writes it (server/certs.py; a test keeps the two equal).
CA_CERT = "ca.crt"
NODE_KEY = "node-auth.key"
STOP_GRACE_S = 15.0
POLL_S = 0.5
# Flower logs this once the SuperLink has accepted the node.
CONNECTED = re.compile(r"SuperNode ID: (\d+)")
RECEIVED = re.compile(r"Receiving: (\w+) message")
EXIT_CODE = re.compile(r"Exit Code: (\d+)")
# Flower's words when the SuperLink does not accept the node's key.
REFUSED = "Failed to activate SuperNode"
REFUSED_RETRY_S = 10.0
# What the SuperNode logs when it leaves after the SuperLink stopped recognising it (not on our
# own SIGTERM: medfed is no longer watching then).
DROPPED = "SuperNode terminated gracefully"


class ConnectFailed(MedfedError):
    """The SuperNode could not join, or left unexpectedly (the CLI exits 1, not 2)."""


@dataclass
class Site:
    name: str
    data: Path
    superlink: str
    certs: Path | None   # None: --insecure
    log: Path
    connect_timeout: float
    # What the site keeps between messages: its decoded images, frozen features, privacy spend.
    state_dir: Path

    @property
    def audit_log(self) -> Path:
        """Every message this site ran, beside the SuperNode's log (client/audit.py)."""
        return self.log.with_name(f"{self.log.stem}.audit.jsonl")


def prepare(*, site: str, data: Path, superlink: str, certs: Path | None, insecure: bool,
            log: Path | None, connect_timeout: float, state_dir: Path | None = None) -> Site:
    """Check the options of `medfed client`; nothing is started here."""
    # The name and path travel inside Flower's --node-config as TOML literal strings ('...').
    if not site or any(c.isspace() or c in "'\"" for c in site):
        raise MedfedError(f"--site {site!r}: give the site's name from sites.yaml, e.g. hospital-a")
    log = log or Path(f"supernode-{site}.log")
    # Default: beside the log, so everything the site writes is in one place.
    state_dir = (state_dir or log.resolve().parent / f"medfed-state-{site}").resolve()
    for option, path in (("--data", data), ("--log", log), ("--state-dir", state_dir)):
        if "'" in str(path.resolve()) or "\n" in str(path.resolve()):
            raise MedfedError(f"{option} {path}: a path containing ' or a line break cannot be "
                              f"passed to Flower's --node-config; rename or link the folder")
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit() or "://" in superlink:
        raise MedfedError(f"--superlink {superlink!r}: expected HOST:PORT without a scheme, "
                          f"e.g. fl.example.org:9092")
    check_tls_folder(certs, insecure=insecure, needed=(CA_CERT, NODE_KEY),
                     hint=f"give the folder for {site} that `medfed certs init` wrote (certs/{site}/)")
    if connect_timeout <= 0:
        raise MedfedError(f"--connect-timeout {connect_timeout}: must be more than 0 seconds")
    _check_writable(state_dir)
    return Site(name=site, data=data.resolve(), superlink=superlink,
                certs=None if certs is None else certs.resolve(), log=log,
                connect_timeout=connect_timeout, state_dir=state_dir)


def _check_writable(folder: Path) -> None:
    """Refuse, before joining, a state directory the site could not write at its first round."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".writable-"):
            pass
    except OSError as exc:
        raise MedfedError(f"--state-dir {folder} cannot be written ({exc.strerror or exc}); the "
                          f"site keeps its decoded images and features there: give a folder this "
                          f"user can write, on a disk with room for the images") from None


def check_data(path: Path) -> str:
    """Refuse data the ClientApp could not train on; a one-line description otherwise."""
    if is_collection(path):
        summary = check(path)
        if not summary["usable"]:
            raise MedfedError(f"{path} cannot be used as it is: {'; '.join(summary['errors'])}. "
                              f"`medfed data check {path}` lists every problem")
        counts = ", ".join(f"{c} {n}" for c, n in summary["classes"].items())
        return f"{summary['files']['readable']} images ({counts})"
    if not path.is_file():
        raise MedfedError(f"--data {path} does not exist; give a folder with one subfolder per class, "
                          f"a CSV manifest, or an npz with train/val/test splits")
    splits = load_splits(path)
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise MedfedError(f"{path} has no {', '.join(missing)} split(s); a site's npz needs train, "
                          f"val and test")
    return "npz splits " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)


def supernode_command(site: Site, *, runtime_port: int) -> list[str]:
    node_config = f"site='{site.name}' data-path='{site.data}' state-dir='{site.state_dir}'"
    command = [executable("flower-supernode"), "--superlink", site.superlink,
               "--node-config", node_config,
               # The ClientApp's local API; several sites on one machine need distinct ports.
               "--host", "127.0.0.1", "--port", str(runtime_port)]
    if site.certs is None:
        return command + ["--insecure"]
    return command + ["--root-certificates", str(site.certs / CA_CERT),
                      "--auth-supernode-private-key", str(site.certs / NODE_KEY)]


def guarded_env(folder: Path, *, audit_log: Path) -> dict[str, str]:
    """Flower's environment with `flwr-clientapp` resolving to medfed's guard (Flower's SuperExec
    starts that program by name, through PATH, for every message), which appends each message
    to `audit_log`."""
    guard = folder / "flwr-clientapp"
    guard.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m medfed.client.app_guard "$@"\n')
    guard.chmod(0o755)
    env = flower_env()
    env["PATH"] = f"{folder}:{env['PATH']}"
    env[AUDIT_ENV] = str(audit_log.resolve())
    return env


def run(site: Site, *, progress=print) -> None:
    """Start the SuperNode and stay with it until Ctrl-C (KeyboardInterrupt) or until it stops;
    the SuperNode is stopped on every way out."""
    guard = Path(tempfile.mkdtemp(prefix="medfed-guard-"))
    try:
        _supervise(site, env=guarded_env(guard, audit_log=site.audit_log), progress=progress)
    finally:
        shutil.rmtree(guard, ignore_errors=True)


def _supervise(site: Site, *, env: dict[str, str], progress) -> None:
    deadline = time.monotonic() + site.connect_timeout
    refused = False
    while True:
        log = Follower(site.log)
        node = Child(supernode_command(site, runtime_port=free_port()), log=site.log, env=env)
        try:
            node_id = _wait_connected(site, node, log, deadline=deadline, refused_before=refused)
            if node_id is None:
                refused = True
                progress(f"the SuperLink refused {site.name}'s key for now (not registered yet, or "
                         f"an earlier connection still counted); retrying in {REFUSED_RETRY_S:.0f} s")
                time.sleep(max(0.0, min(REFUSED_RETRY_S, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    raise ConnectFailed(_refusal(site) + f", for {site.connect_timeout:.0f} s")
                continue
            progress(f"{site.name} joined the SuperLink at {site.superlink} as node {node_id}; the "
                     f"ClientApp reads {site.data}. Waiting for the server's rounds (Ctrl-C to "
                     f"leave); log: {site.log}; audit: {site.audit_log}")
            while node.running():
                for line in log.lines():
                    if match := RECEIVED.search(line):
                        progress(f"{time.strftime('%H:%M:%S')} {match.group(1)} request from the server")
                    elif FOREIGN_APP in line:
                        progress(f"{time.strftime('%H:%M:%S')} {line[line.index(FOREIGN_APP):]}")
                time.sleep(POLL_S)
            text = node.tail(40)
            if DROPPED in text:
                raise ConnectFailed(f"the SuperLink at {site.superlink} no longer knows {site.name}'s "
                                    f"node (a new study, or a server restarted without its "
                                    f"database); run `medfed client` again to join it")
            raise ConnectFailed(f"the SuperNode stopped: "
                                f"{_reason(site, text=text, code=node.process.returncode)}")
        finally:
            with shielded():
                node.stop(grace=STOP_GRACE_S)


def _wait_connected(site: Site, node: Child, log: Follower, *, deadline: float,
                    refused_before: bool) -> str | None:
    """The node id once the SuperLink accepted the node; None when it refused the key and there
    is time for another try. A server that is starting registers its sites a moment after it
    answers, and a node that dropped out counts as connected for up to a minute, so a refusal
    is retried until --connect-timeout."""
    while time.monotonic() < deadline:
        for line in log.lines():
            if match := CONNECTED.search(line):
                return match.group(1)
        if not node.running():
            text = node.tail(40)
            if REFUSED in text and deadline - time.monotonic() > 1.0:
                return None
            raise ConnectFailed(_reason(site, text=text, code=node.process.returncode))
        time.sleep(POLL_S)
    if refused_before:
        raise ConnectFailed(_refusal(site) + f", for {site.connect_timeout:.0f} s")
    raise ConnectFailed(f"no answer from a SuperLink at {site.superlink} within "
                        f"{site.connect_timeout:.0f} s; check the address and port, that the server "
                        f"runs (`medfed server start`) and that the firewall lets this machine reach "
                        f"it. Log: {site.log}")


def _reason(site: Site, *, text: str, code: int | None) -> str:
    """Flower's exit report in the log (`text`), worded for the hospital's engineer."""
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSL/TLS handshake error" in text:
        if site.certs is None:
            return f"{site.superlink} speaks TLS: drop --insecure and pass this site's --certs"
        return (f"TLS with {site.superlink} failed: the server's certificate is not signed by "
                f"{site.certs / CA_CERT} or not issued for this host name; use the {CA_CERT} of "
                f"this federation and the host name given to `medfed certs init --server-host`")
    if REFUSED in text:
        return _refusal(site)
    flower_code = EXIT_CODE.search(text)
    lines = [line for line in text.splitlines() if line.strip()]
    return (f"flower-supernode exited (code {flower_code.group(1) if flower_code else code}); "
            f"its log {site.log} ends with: {' | '.join(lines[-4:])}")


def _refusal(site: Site) -> str:
    return (f"the SuperLink at {site.superlink} refused {site.name}'s key: either it is not "
            f"registered there (is {site.name} in the server's sites.yaml?), or a SuperNode with "
            f"this key is connected already (another `medfed client --site {site.name}`?)")
