"""Flower's long-running programs (`flower-superlink`, `flower-supernode`, nginx) as supervised
children, and the processes below medfed.

medfed adds no transport of its own: deployment is these processes, started with the right flags,
watched through their logs and exit codes, and stopped in order; none outlives medfed.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from medfed.common.errors import MedfedError

ANSI = re.compile(r"\x1b\[[0-9;]*m")


# prctl(2) option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1
# The signal a Child gets when medfed dies without stopping it (SIGKILL, OOM killer, crash).
# SIGTERM, not SIGKILL: it is the signal `Child.stop` sends first, on which every program medfed
# starts shuts down in order and takes its own children with it. flower-superlink terminates its
# flower-superexec; flower-supernode stops gRPC; nginx's master stops its workers (SIGKILL of the
# master would orphan workers that keep the sites' port). Flower's SIGTERM handler cannot hang:
# `flwr_exit` forces `os._exit` after 5 s. The kernel signals only the direct child; the
# watchdog (`_watch`) takes care of the processes below it.
DEATH_SIGNAL = signal.SIGTERM


def _parent_death_hook(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` making the child receive `signum` when medfed dies; None off Linux, or
    where prctl is unavailable (the child then lives on as before).

    The kernel sends the signal when the *thread* that forked the child ends, so the hook is
    used only from the main thread (whose end is medfed's end). Everything is resolved here,
    before the fork: between fork and exec the child runs only the prctl call, getppid and kill.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent, getppid, kill, getpid = os.getpid(), os.getppid, os.kill, os.getpid
    number = int(signum)

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)
        # medfed died between fork and prctl: no one would send the signal any more.
        if getppid() != parent:
            kill(getpid(), number)

    return hook


# The watchdog: how often it notes the processes below each Child, and how long after medfed's
# death it lets them stop by themselves before SIGKILL (Flower forces its own exit after 5 s).
WATCH_INTERVAL_S = 1.0
WATCHDOG_GRACE_S = 10.0
_watchdog: subprocess.Popen | None = None


def _watch(pid: int) -> None:
    """Have the watchdog look after `pid` (a Child's process) and what it starts.

    Started with the first Child, it outlives medfed: it holds the reading end of a pipe whose
    writing end only medfed has, so it learns of medfed's death, however it died (kill -9, the
    OOM killer, a crash), from the end of the pipe. It then ends what medfed's children had
    started too, which PR_SET_PDEATHSIG cannot reach: flower-superexec (detached in a session of
    its own), flwr-serverapp and flwr-clientapp. These watch their parent's PID themselves, but
    the SIGINT they then raise waits for their main thread, which may sit in a connection retry's
    back-off (up to 20 s, again and again): a flwr-serverapp was seen running 45 s after its
    SuperLink had gone. Only on Linux (it reads /proc)."""
    global _watchdog
    if not Path("/proc").is_dir():
        return
    try:
        if _watchdog is None or _watchdog.poll() is not None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-m", "medfed.common.processes", "--watch", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # not in medfed's process group: Ctrl-C is medfed's
        _watchdog.stdin.write(f"{pid}\n".encode())
        _watchdog.stdin.flush()
    except OSError:  # no watchdog: PR_SET_PDEATHSIG and Flower's own monitors remain
        pass


def watchdog(medfed: int) -> None:
    """The watchdog's loop (`python -m medfed.common.processes --watch PID`): note the PIDs medfed
    sends and every process below them, until the pipe from medfed ends or medfed is gone; then
    SIGTERM what still runs (each Flower process stops in order on it, within 5 s), wait up to
    WATCHDOG_GRACE_S, and SIGKILL the rest.

    SIGTERM from outside reaches a Flower process's main thread even when it is blocked, which
    the SIGINT that Flower's own parent monitor raises from another thread does not."""
    import select

    fd = sys.stdin.fileno()
    known: dict[int, str] = {}
    buffered = b""
    while os.getppid() == medfed:
        ready, _, _ = select.select([fd], [], [], WATCH_INTERVAL_S)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                break
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if line.strip().isdigit():
                    known.update(tree({int(line)}))
        known = _still_running({**known, **tree(set(known))})
    # medfed has ended. A clean exit stopped everything already; otherwise, as Child.stop would.
    known = _still_running({**known, **tree(set(known))})
    for pid, start in known.items():
        _signal(pid, start, signal.SIGTERM)
    deadline = time.monotonic() + WATCHDOG_GRACE_S
    while known and time.monotonic() < deadline:
        time.sleep(0.2)
        known = _still_running({**known, **tree(set(known))})
    for pid, start in known.items():
        _signal(pid, start, signal.SIGKILL)


def _still_running(processes: dict[int, str]) -> dict[int, str]:
    return {pid: start for pid, start in processes.items()
            if pid != os.getpid() and alive(pid, start)}


def _signal(pid: int, start: str, number: int) -> None:
    if alive(pid, start):
        try:
            os.kill(pid, number)
        except (ProcessLookupError, PermissionError):
            pass


class Child:
    """One long-running Flower process whose output goes to a log file.

    It does not outlive medfed: on Linux the kernel sends it SIGTERM when medfed dies
    (PR_SET_PDEATHSIG, see DEATH_SIGNAL), and medfed's watchdog (`_watch`) sends SIGTERM to
    everything it started, then SIGKILL to what still runs 10 s later. A `kill -9` of medfed
    leaves no SuperLink holding the port or its database, no SuperNode training unwatched, no
    ServerApp or ClientApp, no nginx behind."""

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
                                            start_new_session=True,
                                            preexec_fn=_parent_death_hook(DEATH_SIGNAL))
        _watch(self.process.pid)

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


def descendants(root: int) -> dict[int, str]:
    """The processes below `root` now, as PID -> start time (to tell a reused PID apart);
    empty where /proc is not available."""
    return tree({root}, include_roots=False)


def tree(roots: set[int], *, include_roots: bool = True) -> dict[int, str]:
    """`roots` and every process below them now (one pass over /proc), as PID -> start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                children.setdefault(int(stat[1]), []).append(int(entry))
                started[int(entry)] = stat[19]
    found: dict[int, str] = {}
    todo = [pid for root in roots for pid in children.get(root, [])]
    if include_roots:
        todo += [root for root in roots if root in started]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = started[pid]
            todo.extend(children.get(pid, []))
    return found


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` runs (a zombie does not; with `started`, only that very process)."""
    stat = _proc_stat(pid)
    if stat is None:
        if not Path("/proc").is_dir():  # not Linux: ask the kernel
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False
    return stat[0] not in ("Z", "X") and (started is None or stat[19] == started)


def end_processes(processes: dict[int, str], *, grace: float) -> None:
    """Wait up to `grace` seconds for `processes` (from `descendants`) to end; SIGKILL the rest."""
    deadline = time.monotonic() + grace
    left = dict(processes)
    while left:
        left = {pid: start for pid, start in left.items() if alive(pid, start)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def tail(path: Path, lines: int = 15, *, start: int = 0) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(start, path.stat().st_size - 20_000))
        text = handle.read().decode(errors="replace")
    return "\n".join(ANSI.sub("", text).splitlines()[-lines:])


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    watchdog(int(sys.argv[2]))
