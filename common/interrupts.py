"""How medfed itself ends on Ctrl-C and SIGTERM: in order, once, and with nothing left running.

A signal becomes a KeyboardInterrupt that the command unwinds, stopping the Flower processes it
started; a second Ctrl-C during that shutdown ends the process at once instead of waiting on it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from medfed.common.processes import descendants, end_processes


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (docker stop, systemd, kill) end medfed as Ctrl-C does, so the Flower
    processes it started are stopped in order instead of being orphaned. SIGINT too, always:
    a process started in the background by a shell without job control (`medfed client &`,
    `nohup`, some supervisors) inherits SIGINT ignored, and Python then leaves it ignored, so
    Ctrl-C or `kill -INT` would never stop it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


# Ctrl-C and `kill` (docker stop, systemd): the signals `interrupt_once` takes.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The processes below this one when the first Ctrl-C arrived (see `interrupt_once`).
_BELOW_AT_INTERRUPT: dict[int, str] = {}


@contextmanager
def interrupt_once(message: str, *, code: int = 130,
                   on_interrupt: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, the first Ctrl-C (or SIGTERM) raises KeyboardInterrupt; a second one, while
    the first is still being handled, prints `message` and ends the process at once with `code`
    (no "Exception ignored" noise from inside a half-finished shutdown, and never a wait on a
    hung one). Handle the KeyboardInterrupt inside the block.

    The first one also notes the processes below this one then (Ray's), which libraries may
    orphan while they unwind: `stop_descendants` ends them; and it calls `on_interrupt` first
    (e.g. to silence a library's errors about its work being cut short)."""
    def interrupt(signum, frame):
        for number in SIGNALS:
            signal.signal(number, _exit_handler(message, code))
        _BELOW_AT_INTERRUPT.update(descendants(os.getpid()))
        if on_interrupt is not None:
            on_interrupt()
        raise KeyboardInterrupt
    previous = {number: signal.signal(number, interrupt) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def sigterm_despite_ray() -> Iterator[None]:
    """`ray.init`, inside Flower's Simulation Engine, replaces the SIGTERM handler with
    `sys.exit(15)` (and its C++ core a stack dump), which unwinds the engine past medfed's
    Ctrl-C handling: its threads then print the actors' deaths as tracebacks. Within the block,
    SIGTERM gets Ctrl-C's handler back as soon as Ray has started, from Ray's post-init hooks
    (run at the end of `ray.init`), and the handler from before the block after it."""
    # A private list, but Flower pins Ray's version; the slow SIGTERM test fails if it goes.
    from ray._private import worker as ray_worker

    def like_ctrl_c() -> None:
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))

    previous = signal.getsignal(signal.SIGTERM)
    ray_worker._post_init_hooks.append(like_ctrl_c)
    try:
        yield
    finally:
        ray_worker._post_init_hooks.remove(like_ctrl_c)
        signal.signal(signal.SIGTERM, previous)


def _exit_handler(message: str, code: int) -> Callable[..., None]:
    line = (message + "\n").encode(errors="replace")

    def handler(*_) -> None:
        try:
            os.write(2, line)
        finally:
            os._exit(code)
    return handler


def stop_descendants(*, timeout: float = 10.0) -> None:
    """End what this process started: shut Ray down if it runs here (waiting at most `timeout`),
    then wait up to 3 s for every process below this one, now or at the first Ctrl-C, and
    SIGKILL what is left.

    After `ray.shutdown` (which Flower's Simulation Engine also calls as it unwinds) Ray's
    workers notice the raylet gone only seconds later, later still when busy training."""
    processes = {**_BELOW_AT_INTERRUPT, **descendants(os.getpid())}
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        stopper = threading.Thread(target=ray.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
    end_processes(processes, grace=3.0)


def exit_now(message: str, *, code: int, cleanup: Callable[[], None] | None = None) -> NoReturn:
    """Print `message` on stderr and end the process with `code` without waiting for its threads.

    For an interrupted simulation: Flower's Simulation Engine leaves non-daemon threads behind
    (the ServerApp's, waiting for replies for up to the round timeout; the engine's workers,
    blocked in `ray.get` on actors that are gone) and a normal exit would join them. Nothing is
    lost by not waiting: checkpoints are written atomically, and an unfinished simulation's
    files stay in its `<out>.incomplete/`, which is named as such."""
    try:
        if threading.current_thread() is threading.main_thread():
            # Another Ctrl-C while cleaning up: stop waiting, end now.
            signal.signal(signal.SIGINT, _exit_handler(message, code))
        if cleanup is not None:
            try:
                cleanup()
            except Exception:  # the process ends either way; the message must still show
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
    finally:
        os._exit(code)


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

