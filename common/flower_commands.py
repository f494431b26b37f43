"""Running Flower's programs: their environment and executables, one-shot `flwr` commands with a
JSON answer, and the checks before a Flower process starts (its TLS folder, its ports).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from medfed.common.errors import MedfedError
from medfed.common.processes import ANSI

BIN = Path(sys.executable).parent


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
