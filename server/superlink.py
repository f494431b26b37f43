"""`medfed server start`: one study on Flower's deployment engine, from start to report.

It starts `flower-superlink` (TLS from `medfed certs init`, `--enable-supernode-auth`, its state
in `<run_dir>/superlink.db`), registers the public keys of the sites in sites.yaml with
`flwr supernode register`, launches the medfed ServerApp with `flwr run` on the generated Flower app
(server/flower_app.py) for the checked study (server/study.py), follows the
run until it ends, and stops the SuperLink. The ServerApp receives everything through Flower's
run config and writes its checkpoints and report into the run directory.

Flower 1.42's SuperLink serves its Fleet API (the sites), Control API (`flwr`) and Runtime API
(the ServerApp) on one HTTPS port, the Control API without authentication. So the SuperLink
listens on this machine's loopback only, on a port of its own, and the sites connect to
`HOST:PORT`, where nginx (server/proxy.py) lets through the Fleet API and nothing else.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from medfed.common.errors import MedfedError
from medfed.common.files import write_json
from medfed.common.flower_commands import (
    FlowerCommandError, check_port_free, executable, flower_env, flwr_json, free_port,
)
from medfed.common.interrupts import shielded
from medfed.common.processes import Child, Follower, tail
from medfed.server.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from medfed.server.flower_app import CONNECTION, write_app, write_connection
from medfed.server.proxy import start_proxy
from medfed.server.run_files import CONFIG_FILE, ERROR_FILE, NODES_FILE, PROGRESS_FILE, REPORT_FILE
from medfed.server.study import Study

HEALTH_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
POLL_S = 2.0


class RunFailed(MedfedError):
    """The federation ran and did not finish (the CLI exits 1, not 2)."""


def serve(study: Study, *, progress=print) -> dict:
    """Run the study on a fresh SuperLink; the report, or RunFailed. The SuperLink is stopped on
    every way out, Ctrl-C included."""
    check_port_free(study.host, study.port, option="--port")
    link_port = free_port()  # the SuperLink's own, on loopback: never reachable from the network
    run_dir = study.run_dir
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(study.config.to_dict(), sort_keys=False))
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    if study.certs is None:
        progress("WARNING: --insecure: no TLS and no site authentication; anyone who reaches "
                 f"port {study.port} can join the federation or read its traffic. For tests only.")
    flwr_home = run_dir / "flwr-home"
    # FLWR_HOME in the run directory: Flower installs the app bundle there, not in ~/.flwr.
    superlink = Child(_superlink_command(study, port=link_port), log=logs / "superlink.log",
                      env=flower_env(FLWR_HOME=str(flwr_home)), cwd=run_dir)
    children = [superlink]
    run_id, finished = None, False
    try:
        _wait_healthy(study, superlink, port=link_port)
        proxy = start_proxy(folder=run_dir / "proxy", host=study.host, port=study.port,
                            upstream_port=link_port, certs=study.certs, log=logs / "proxy.log")
        children.append(proxy)
        _wait_healthy(study, proxy, port=study.port)
        progress(f"SuperLink up on 127.0.0.1:{link_port}; the sites' Fleet API only on "
                 f"{study.host}:{study.port} through nginx ({'TLS' if study.certs else 'plaintext'}); "
                 f"logs: {superlink.log}, {proxy.log}")
        write_connection(study, flwr_home, port=link_port)
        if study.certs is not None:
            _register_sites(study, flwr_home, progress=progress)
        app_dir = write_app(study)
        run_id = int(flwr_json(["run", str(app_dir), CONNECTION], flwr_home=flwr_home,
                               timeout=120)["run-id"])
        progress(f"run {run_id} started; waiting up to {study.wait_s:.0f} s for the "
                 f"{len(study.sites)} sites ({', '.join(study.sites)}), at least {study.min_sites}")
        status = _follow(study, children, run_id=run_id, flwr_home=flwr_home, progress=progress)
        finished = True
        return _outcome(study, status)
    except FlowerCommandError as exc:
        raise RunFailed(str(exc)) from None
    finally:
        with shielded():
            if run_id is not None and not finished and superlink.running():
                # Interrupted or timed out: end the run first, so its ServerApp does not linger.
                try:
                    flwr_json(["stop", str(run_id), CONNECTION], flwr_home=flwr_home, timeout=30)
                except FlowerCommandError:
                    pass
            for child in reversed(children):
                child.stop(grace=STOP_GRACE_S)


def _superlink_command(study: Study, *, port: int) -> list[str]:
    command = [executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
               "--database", str(study.run_dir / "superlink.db"),
               # medfed is installed here already; the generated app bundle declares no dependencies.
               "--disable-runtime-dependency-installation"]
    if study.certs is None:
        return command + ["--insecure"]
    return command + ["--ssl-ca-certfile", str(study.certs / CA_CERT),
                      "--ssl-certfile", str(study.certs / SERVER_CERT),
                      "--ssl-keyfile", str(study.certs / SERVER_KEY),
                      "--enable-supernode-auth"]


def _wait_healthy(study: Study, child: Child, *, port: int) -> None:
    """Until `child` (the SuperLink, or the proxy in front of it) answers /health on `port`."""
    scheme = "http" if study.certs is None else "https"
    context = None if study.certs is None else ssl.create_default_context(cafile=str(study.certs / CA_CERT))
    url = f"{scheme}://127.0.0.1:{port}/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.running():
            raise RunFailed(f"{child.name} exited (code {child.process.returncode}) while "
                            f"starting; its log {child.log} ends with:\n{child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                if answer.status == 200:
                    return
        except ssl.SSLError as exc:
            raise MedfedError(f"the SuperLink's TLS certificate does not verify against "
                              f"{study.certs / CA_CERT} ({exc.reason}); recreate the certificates "
                              f"with `medfed certs init`") from None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RunFailed(f"{child.name} did not answer on port {port} within {HEALTH_TIMEOUT_S:.0f} s; "
                    f"see {child.log}")


def _register_sites(study: Study, flwr_home: Path, *, progress) -> None:
    """Admit exactly the sites of sites.yaml; their node ids go to nodes.json for `medfed status`
    (Flower lists nodes by id only)."""
    nodes_file = study.run_dir / NODES_FILE
    nodes = json.loads(nodes_file.read_text()) if nodes_file.is_file() else {}
    for site, key in study.sites.items():
        try:
            answer = flwr_json(["supernode", "register", str(key), CONNECTION, "--name", site],
                               flwr_home=flwr_home, timeout=60)
        except FlowerCommandError as exc:
            # A resumed run reopens its SuperLink database, where the sites are registered already.
            if "already in use" not in str(exc):
                raise FlowerCommandError(f"cannot register site {site} ({key}): {exc}") from None
            progress(f"site {site} registered already (node {nodes.get(site, '?')})")
            continue
        nodes[site] = str(answer["node-id"])
        progress(f"registered site {site} (node {nodes[site]})")
    write_json(nodes_file, nodes)


def _follow(study: Study, children: list[Child], *, run_id: int, flwr_home: Path,
            progress) -> str:
    """Echo the ServerApp's progress until the run finishes; Flower's final status of the run.

    `flwr log --stream` copies the ServerApp's own output (tracebacks included) into
    logs/serverapp.log, which outlives the SuperLink, and ends when Flower marks the run
    finished: that end is the signal to ask for the run's status."""
    progress_log = Follower(study.run_dir / PROGRESS_FILE)
    services = list(children)  # the SuperLink and its proxy: both must live to the end
    deadline = time.monotonic() + study.deadline_s
    while True:
        stream = Child([executable("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                       log=study.run_dir / "logs" / "serverapp.log",
                       env=flower_env(FLWR_HOME=str(flwr_home)))
        children.append(stream)
        while stream.running():
            for line in progress_log.lines():
                progress(line)
            for service in services:
                if not service.running():
                    raise RunFailed(f"{service.name} stopped during the run "
                                    f"(exit code {service.process.returncode}); see {service.log}:\n"
                                    f"{service.tail()}")
            if time.monotonic() >= deadline:
                raise RunFailed(f"run {run_id} did not finish within {study.deadline_s:.0f} s "
                                f"(--wait-sites + rounds x federation.round_timeout); stopped it")
            time.sleep(POLL_S)
        for line in progress_log.lines():
            progress(line)
        runs = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], flwr_home=flwr_home,
                         timeout=60)["runs"]
        if runs and runs[0]["status"].startswith("finished"):
            details = runs[0].get("status-details")
            return runs[0]["status"] + (f" ({details})" if details not in (None, "", "N/A") else "")
        # The stream broke off early (a network hiccup): follow on with a new one.
        time.sleep(POLL_S)


def _outcome(study: Study, status: str) -> dict:
    run_dir = study.run_dir
    error = run_dir / ERROR_FILE
    if error.is_file():
        raise RunFailed(f"the run failed: {error.read_text().strip()}")
    report = run_dir / REPORT_FILE
    if not status.startswith("finished:completed") or not report.is_file():
        raise RunFailed(f"the run ended as {status} without a report; the ServerApp's log "
                        f"{run_dir / 'logs' / 'serverapp.log'} ends with:\n"
                        f"{tail(run_dir / 'logs' / 'serverapp.log')}")
    return json.loads(report.read_text())


def status(run_dir: Path) -> list[str]:
    """What the SuperLink of a running `medfed server start` knows: its runs and the sites."""
    flwr_home = run_dir / "flwr-home"
    if not (flwr_home / "config.toml").is_file():
        raise MedfedError(f"{run_dir} is not the directory of a `medfed server start` run")
    try:
        runs = flwr_json(["ls", CONNECTION], flwr_home=flwr_home, timeout=30)["runs"]
    except FlowerCommandError as exc:
        raise MedfedError(f"no SuperLink of {run_dir} answers (is `medfed server start` running?): "
                          f"{exc}") from None
    lines = [f"run {r['run-id']}: {r['status']}, {float(r['elapsed']):.0f} s" for r in runs]
    nodes_file = run_dir / NODES_FILE
    names = {v: k for k, v in json.loads(nodes_file.read_text()).items()} if nodes_file.is_file() else {}
    for node in flwr_json(["supernode", "ls", CONNECTION], flwr_home=flwr_home, timeout=30)["nodes"]:
        name = names.get(str(node["node-id"]), f"node {node['node-id']}")
        lines.append(f"site {name}: {node['status']} (online since {node['online-at']})"
                     if node["status"] == "online" else f"site {name}: {node['status']}")
    return lines
