"""Progress a person can watch on a long step: a bar on a terminal, plain lines in a log.

Decoding a hospital folder, computing frozen features or training a baseline can take minutes
with nothing else to show. On a terminal tqdm draws a bar; anywhere else (a SuperNode's log, CI,
a file) a bar's carriage returns would be noise, so a line is written at most every
`LINE_EVERY_S` seconds, and once at the end of a step that took longer than that.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

LINE_EVERY_S = 10.0
T = TypeVar("T")


class Progress:
    """`total` units of work called `what`; `advance(n)` as they are done, `close()` at the end."""

    def __init__(self, what: str, *, total: int, unit: str = "images", stream=None,
                 every_s: float = LINE_EVERY_S) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        terminal = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream,
                        leave=False) if terminal else None

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            elapsed = now - self.started
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            self._line(f"{self.done:,}/{self.total:,} {self.unit} "
                       f"({self.done / self.total:.0%}), {_duration(elapsed)} so far, "
                       f"about {_duration(left)} left")

    def close(self, *, finished: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.started
        if elapsed < self.every_s:
            return  # a short step needs no report
        took = _duration(elapsed)
        self._line(f"{self.done:,} {self.unit} in {took}" if finished else
                   f"stopped after {self.done:,}/{self.total:,} {self.unit} ({took})")

    def _line(self, text: str) -> None:
        print(f"{self.what}: {text}", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(finished=kind is None)


def tracked(items: Iterable[T], *, what: str, total: int, unit: str = "images",
            stream=None) -> Iterator[T]:
    """`items`, one at a time, counted as they are taken."""
    with Progress(what, total=total, unit=unit, stream=stream) as progress:
        for item in items:
            yield item
            progress.advance()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet to estimate from
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
