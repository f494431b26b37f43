"""Flower's own programs (`flower-superlink`, `flower-supernode`, `flwr`) as supervised children.

medfed adds no transport of its own: deployment is these processes, started with the right flags,
watched through their logs and exit codes, and stopped in order.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medfed.common.errors import MedfedError

BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flower_env(**extra: str) -> dict[str, str]:
    """The environment of every Flower child process.

    Flower starts further programs by name (`flower-superexec`, `flwr-serverapp`,
    `flwr-clientapp`), so this environment's own bin folder comes first on PATH. Telemetry and
    the update check are off: a hospital's node must not contact anyone but its SuperLink."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        **extra,
    }


def executable(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        raise MedfedError(f"{name} is not installed beside this Python ({BIN}); reinstall medfed "
                          f"with its dependencies (pip install -e .)")
    return str(path)


class Child:
    """One long-running Flower process whose output goes to a log file."""

    def __init__(self, args: list[str], *, log: Path, env: dict[str, str], cwd: Path | None = None):
        self.log = log
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("ab")
        except OSError as exc:
            raise MedfedError(f"cannot write the log file {log} ({exc.strerror}); choose a writable "
                              f"place") from None
        with handle:
            self.log_start = handle.tell()  # the log may hold earlier processes' output
            # Its own session: Ctrl-C in the terminal reaches medfed alone, which then stops the
            # child in order instead of every process dying at once.
            self.process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                            start_new_session=True)

    @property
    def name(self) -> str:
        return Path(self.process.args[0]).name

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, *, grace: float) -> None:
        """SIGTERM (Flower shuts down cleanly on it), then SIGKILL to whatever is left of its
        process group: a ClientApp or ServerApp that Flower started can outlive its parent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def tail(self, lines: int = 15) -> str:
        """The last lines this process wrote to its log."""
        return tail(self.log, lines, start=self.log_start)


class Follower:
    """The complete lines a growing text file gains from now on, for echoing a log."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [ANSI.sub("", line) for line in complete.decode(errors="replace").splitlines()]


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (docker stop, systemd, kill) end medfed as Ctrl-C does, so the Flower
    processes it started are stopped in order instead of being orphaned."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM for a block: a second signal must not cut a shutdown short and
    leave a Flower process behind."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def tail(path: Path, lines: int = 15, *, start: int = 0) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(start, path.stat().st_size - 20_000))
        text = handle.read().decode(errors="replace")
    return "\n".join(ANSI.sub("", text).splitlines()[-lines:])


def check_port_free(host: str, port: int, *, option: str) -> None:
    """Refuse a port another program holds, naming it, before a Flower process fails on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn does: a port left in TIME_WAIT by a previous run is free to bind.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MedfedError(f"port {port} on {host} is already in use (another SuperLink or "
                                  f"program?); stop it or choose another {option}") from None
            raise MedfedError(f"cannot listen on {host}:{port} ({exc.strerror}); check {option}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def flwr_json(args: list[str], *, flwr_home: Path, timeout: float) -> dict:
    """Run one `flwr ... --format json` command; its JSON answer, or FlowerCommandError with
    Flower's own message (`flwr` exits 0 even when the answer says it failed)."""
    command = [executable("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=flower_env(FLWR_HOME=str(flwr_home)), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FlowerCommandError(f"`flwr {args[0]}` got no answer from the SuperLink within "
                                 f"{timeout:.0f} s") from None
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        detail = ANSI.sub("", (done.stderr or done.stdout).strip()).splitlines()
        raise FlowerCommandError(f"`flwr {' '.join(args[:2])}` failed (exit {done.returncode}): "
                                 f"{detail[-1] if detail else 'no output'}")
    if not answer.get("success", False):
        message = ANSI.sub("", str(answer.get("error-message", "no reason given")))
        raise FlowerCommandError(" ".join(m for m in message.splitlines()
                                          if m.strip() and not m.startswith("Using SuperLink")))
    return answer


class FlowerCommandError(MedfedError):
    """`flwr` did not do what was asked: no answer, or a refusal (Flower's message is the text)."""


def check_tls_folder(certs: Path | None, *, insecure: bool, needed: tuple[str, ...], hint: str) -> None:
    """`--certs` and `--insecure` exclude each other; a TLS connection needs its files."""
    if insecure:
        if certs is not None:
            raise MedfedError("--insecure means no TLS; leave out --certs (or drop --insecure)")
        return
    if certs is None:
        raise MedfedError(f"--certs is required: {hint}; plaintext only with --insecure")
    missing = [name for name in needed if not (certs / name).is_file()]
    if missing:
        raise MedfedError(f"{certs} lacks {', '.join(missing)}; {hint}")
