"""Faults end cleanly: a `kill -9` of medfed takes the Flower processes (and nginx) it started
with it, so the next start finds its port free; one Ctrl-C ends `medfed simulate` in seconds with
medfed's own line and nothing left running.

Every process a test starts is ended by PID in its teardown; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from commands import MEDFED, TINY, TINY_WEIGHTS

from medfed.common.flower_commands import free_port
from medfed.common.processes import alive, descendants

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc are Linux's")


def _wait_gone(pids, *, timeout: float) -> list[int]:
    """The PIDs (dict PID -> start time, from `descendants`) still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid, start in pids.items() if alive(pid, start)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _commands(pids) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes()
                       .replace(b"\0", b" ").decode(errors="replace")[:160])
        except OSError:
            pass
    return out


def _kill_all(pids) -> None:
    """SIGKILL what still runs of `pids` (a dict PID -> start time: only those very processes,
    never a later one that got a PID again; or a list of PIDs found running just now)."""
    started = pids if isinstance(pids, dict) else dict.fromkeys(pids)
    for pid, start in started.items():
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _parent(code: str) -> subprocess.Popen:
    """A Python process running `code` (which prints its children's PIDs, then waits)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)


def _read_line(process: subprocess.Popen, *, timeout: float) -> str:
    """One line of `process`'s stdout, or fail after `timeout` (readline alone could block)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        process.kill()
        pytest.fail(f"no line from the parent process within {timeout:.0f} s "
                    f"(exit {process.poll()})")
    return box[0]


@linux_only
def test_child_dies_when_medfed_is_killed(tmp_path):
    parent = _parent(f"""
        import time
        from pathlib import Path
        from medfed.common.flower_commands import flower_env
        from medfed.common.processes import Child
        child = Child(["sleep", "60"], log=Path({str(tmp_path / "sleep.log")!r}), env=flower_env())
        print(child.process.pid, flush=True)
        time.sleep(60)
    """)
    before = {}
    try:
        child = int(_read_line(parent, timeout=30))
        before = descendants(parent.pid)  # the sleep and medfed's watchdog
        assert child in before and len(before) == 2, _commands(before)
        parent.kill()
        parent.wait(timeout=10)
        # The kernel's SIGTERM (PR_SET_PDEATHSIG): at once, not after the watchdog's interval.
        assert not _wait_gone({child: before[child]}, timeout=1), "sleep outlived its parent"
        left = _wait_gone(before, timeout=5)
        assert not left, f"left running: {_commands(left)}"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        _kill_all(before)


@linux_only
def test_what_a_child_started_in_a_session_of_its_own_dies_too(tmp_path):
    """As flower-superlink starts flower-superexec (detached): the kernel signals only medfed's
    own child; medfed's watchdog ends the grandchild."""
    parent = _parent(f"""
        import time
        from pathlib import Path
        from medfed.common.flower_commands import flower_env
        from medfed.common.processes import Child, descendants
        child = Child(["sh", "-c", "setsid sleep 60 & wait"], log=Path({str(tmp_path / "sh.log")!r}),
                      env=flower_env())
        while not any(Path(f"/proc/{{pid}}/cmdline").read_bytes().startswith(b"sleep")
                      for pid in descendants(child.process.pid)):
            time.sleep(0.05)
        time.sleep(2)  # the watchdog notes what runs below its children every second
        print(child.process.pid, flush=True)
        time.sleep(60)
    """)
    before = {}
    try:
        child = int(_read_line(parent, timeout=30))
        before = descendants(parent.pid)
        grandchild = [pid for pid in descendants(child) if pid in before]
        assert len(grandchild) == 1 and len(before) == 3, _commands(before)  # sh, sleep, watchdog
        parent.kill()
        parent.wait(timeout=10)
        left = _wait_gone(before, timeout=5)
        assert not left, f"left running: {_commands(left)}"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        _kill_all(before)


@linux_only
def test_nginx_of_a_killed_medfed_stops_and_frees_its_port(tmp_path):
    """nginx's master gets SIGTERM and stops its workers: a SIGKILL of the master would leave a
    worker holding the sites' port, and `medfed server start --resume` refused."""
    from medfed.server.proxy import nginx_executable

    try:
        nginx_executable()
    except Exception as exc:  # noqa: BLE001 - any reason nginx is missing skips
        pytest.skip(str(exc))
    port = free_port()
    parent = _parent(f"""
        import time
        from pathlib import Path
        from medfed.server.proxy import start_proxy
        proxy = start_proxy(folder=Path({str(tmp_path / "proxy")!r}), host="127.0.0.1", port={port},
                            upstream_port={free_port()}, certs=None,
                            log=Path({str(tmp_path / "proxy.log")!r}))
        print(proxy.process.pid, flush=True)
        time.sleep(60)
    """)
    tree = {}
    try:
        _read_line(parent, timeout=30)
        # The master, its worker once started, and medfed's watchdog.
        deadline = time.monotonic() + 10
        while not any("nginx: worker" in c for c in _commands(tree)):
            assert time.monotonic() < deadline, _commands(tree)
            time.sleep(0.1)
            tree = descendants(parent.pid)
        parent.kill()
        parent.wait(timeout=10)
        left = _wait_gone(tree, timeout=10)
        assert not left, f"left running: {_commands(left)}"
        import socket
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # the port is free again
    finally:
        parent.kill()
        parent.wait(timeout=10)
        _kill_all(tree)


def _session(sid: int) -> list[int]:
    """The running processes of session `sid` (a test's process started with a new session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def _interrupt(process: subprocess.Popen, how: signal.Signals) -> None:
    """Ctrl-C in a terminal reaches the whole process group; `kill` (docker stop, systemd's
    main process) only medfed's own process."""
    if how == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(how)


@linux_only
# SIGTERM once Ray replaced its handler: slow (30 s more), CI runs Ctrl-C's.
@pytest.mark.parametrize("how", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["ctrl-c", "sigterm"])
def test_one_ctrl_c_stops_simulate_within_seconds(tmp_path, medmnist_dir, how):
    """Ctrl-C (or `kill`) while Flower's simulation trains: exit 130 in seconds with medfed's
    line, the unfinished run kept and named, no traceback, nothing of the run (Ray) left
    running."""
    out = tmp_path / "run"
    env = {**os.environ, "MEDFED_OFFLINE": "1", "MEDFED_DATA_DIR": str(medmnist_dir),
           "PYTHONUNBUFFERED": "1"}
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        # Its own session, as a job in a terminal: Ctrl-C reaches its whole process group.
        process = subprocess.Popen(
            [MEDFED, "simulate", "--dataset", "breastmnist", "--sites", "2", "--rounds", "50",
             *TINY, "--compare", "federated", "--out", str(out),
             "--set", "simulation.cpus_per_site=1"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path,
            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = _read_line(process, timeout=max(1.0, deadline - time.monotonic()))
            lines.append(line)
            if "rounds of" in line:  # the ServerApp runs: round 1 is being trained
                break
        else:
            pytest.fail("simulate did not start training:\n" + "".join(lines))
        # Until the sites' Ray actors train (Flower's threads then wait in ray.get).
        deadline = time.monotonic() + 60
        while not any("ClientAppActor" in c for c in _commands(_session(process.pid))):
            assert time.monotonic() < deadline, "no Ray actor started:\n" + "".join(lines)
            time.sleep(0.2)
        time.sleep(1)

        _interrupt(process, how)
        interrupted = time.monotonic()
        try:
            rest, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"simulate still running 15 s after Ctrl-C:\n{''.join(lines)}"
                        f"{stderr.read_text()}")
        took = time.monotonic() - interrupted
        stdout, errors = "".join(lines) + rest, stderr.read_text()
        assert process.returncode == 130, f"{stdout}\n{errors}"
        assert "Traceback" not in stdout + errors and "Exception ignored" not in errors, errors
        staging = out.with_name(out.name + ".incomplete")
        assert errors.strip().splitlines()[-1] == (
            f"interrupted; nothing is left running; the unfinished run is kept as it is in "
            f"{staging}/"), errors
        assert staging.is_dir() and (staging / "config.yaml").is_file() and not out.exists()
        assert took < 15
        deadline = time.monotonic() + 5
        while _session(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _session(process.pid), f"left running: {_commands(_session(process.pid))}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        _kill_all(_session(process.pid))


@linux_only
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_before_the_simulation_engine_starts(tmp_path, medmnist_dir, how):
    """Ctrl-C (or `kill`) while the sites are being written, before Ray: the same line, exit
    130."""
    out = tmp_path / "run"
    env = {**os.environ, "MEDFED_OFFLINE": "1", "MEDFED_DATA_DIR": str(medmnist_dir),
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [MEDFED, "simulate", "--dataset", "breastmnist", "--sites", "2", *TINY,
         "--compare", "federated", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _read_line(process, timeout=120).startswith("site-0:")
        _interrupt(process, how)
        stdout, errors = process.communicate(timeout=15)
        assert process.returncode == 130, f"{stdout}\n{errors}"
        assert "Traceback" not in stdout + errors, errors
        assert errors.strip().splitlines()[-1].startswith("interrupted; nothing is left running"), errors
        assert not out.exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        _kill_all(_session(process.pid))


# --- slow: a real study, killed with SIGKILL mid-round, then resumed ----------------------------

SITE = "hospital-a"
STUDY = {
    "data": {"classes": ["malignant", "normal, benign"], "image_size": 32},
    "model": {"backbone": "test_efficientnet", "weights": TINY_WEIGHTS},
    "train": {"device": "cpu"},
    "federation": {"rounds": 3, "round_timeout": 120},
}
FLOWER = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
          "flwr-clientapp", "app_guard", "nginx")


class Medfed:
    """One `medfed` process with its output in files."""

    def __init__(self, args: list[str], *, folder: Path, name: str, env: dict[str, str]):
        self.out_file, self.err_file = folder / f"{name}.out", folder / f"{name}.err"
        with self.out_file.open("w") as out, self.err_file.open("w") as err:
            self.popen = subprocess.Popen([MEDFED, *args], stdout=out, stderr=err, env=env,
                                          stdin=subprocess.DEVNULL)

    @property
    def out(self) -> str:
        return self.out_file.read_text()

    @property
    def err(self) -> str:
        return self.err_file.read_text()

    def wait_for(self, text: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {text!r} (exit {self.popen.poll()}):\n{self.out}\n{self.err}")
            time.sleep(0.5)

    def end(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@pytest.mark.slow
@linux_only
def test_sigkill_of_server_and_client_leaves_nothing_and_resume_starts(tmp_path, medmnist_dir):
    from medfed.common.dataset import load_splits, save_splits
    from medfed.server.certs import init_certs

    init_certs(tmp_path / "certs", server_host="localhost", sites=[SITE])
    splits = load_splits(medmnist_dir / "breastmnist.npz")
    save_splits(tmp_path / f"{SITE}.npz", {k: v.subset(slice(0, None, 3)) for k, v in splits.items()})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    env = {**os.environ, "MEDFED_OFFLINE": "1", "FLWR_HOME": str(tmp_path / "flwr-home")}
    port, run_dir = free_port(), tmp_path / "study"
    started: list[Medfed] = []
    trees: dict[int, str] = {}

    def start(name: str, *args: str) -> Medfed:
        started.append(Medfed(list(args), folder=tmp_path, name=name, env=env))
        return started[-1]

    def client(name: str, *, timeout: int = 120) -> Medfed:
        return start(name, "client", "--site", SITE, "--data", str(tmp_path / f"{SITE}.npz"),
                     "--superlink", f"localhost:{port}", "--certs", str(tmp_path / "certs" / SITE),
                     "--log-file", str(tmp_path / f"{name}.log"), "--connect-timeout", str(timeout))

    try:
        server = start("server", "server", "start", "--config", str(tmp_path / "study.yaml"),
                       "--certs", str(tmp_path / "certs"), "--out", str(run_dir),
                       "--host", "127.0.0.1", "--port", str(port), "--wait-sites", "120s")
        server.wait_for("waiting up to", timeout=120)
        site = client("client")
        server.wait_for("round   1/3", timeout=240)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").is_file():  # written once round 1 is evaluated
            assert time.monotonic() < deadline, f"no checkpoint:\n{server.out}\n{server.err}"
            time.sleep(0.5)
        # Round 2 is on its way: ServerApp, SuperExecs and (soon) a ClientApp are all running.
        time.sleep(2)
        site_tree, server_tree = descendants(site.popen.pid), descendants(server.popen.pid)
        trees = {**site_tree, **server_tree}
        names = " ".join(_commands(trees))
        for name in ("flower-superlink", "nginx", "flwr-serverapp", "flower-supernode",
                     "flower-superexec"):
            assert name in names, names

        # The site first (its SuperNode, told by the kernel, leaves the still running SuperLink
        # in order), then the coordinator. Every process below either is gone within seconds:
        # SIGTERM from the kernel to medfed's own children, from medfed's watchdog to the rest.
        for process, tree in ((site, site_tree), (server, server_tree)):
            process.popen.kill()
            process.popen.wait(timeout=10)
            left = _wait_gone(tree, timeout=20)
            assert not left, f"left running after kill -9 of medfed: {_commands(left)}"

        # The next start is not blocked by a stale port or a locked database.
        resumed = start("resumed", "server", "start", "--resume", str(run_dir), "--certs",
                        str(tmp_path / "certs"), "--host", "127.0.0.1", "--port", str(port),
                        "--wait-sites", "120s")
        resumed.wait_for("waiting up to", timeout=120)
        again = client("client-again")
        assert resumed.popen.wait(timeout=600) == 0, f"{resumed.out}\n{resumed.err}\n{again.out}"
        assert "resuming after round 1" in resumed.out and "round   3/3" in resumed.out
    finally:
        for process in started:
            process.end()
        _kill_all(trees)
