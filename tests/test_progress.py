"""Long steps report progress: plain lines in a log, a bar on a terminal."""

from __future__ import annotations

import io

import pytest

from medfed.common import progress as progress_module
from medfed.common.progress import Progress, tracked


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_a_log_gets_a_line_every_interval_with_what_is_left(clock):
    log = io.StringIO()
    with Progress("decoding cxr", total=100, stream=log, every_s=10) as progress:
        for _ in range(100):
            clock.now += 0.5
            progress.advance()
    lines = log.getvalue().splitlines()
    # 50 s in all: a line at 10, 20, 30 and 40 s, then the closing one.
    assert len(lines) == 5
    assert lines[0] == "decoding cxr: 20/100 images (20%), 10 s so far, about 40 s left"
    assert lines[-1] == "decoding cxr: 100 images in 50 s"
    assert "\r" not in log.getvalue()


def test_a_short_step_says_nothing_and_a_failed_one_says_where_it_stopped(clock):
    log = io.StringIO()
    assert list(tracked(range(3), what="quick", total=3, stream=log)) == [0, 1, 2]
    assert log.getvalue() == ""
    with pytest.raises(RuntimeError), Progress("slow", total=10, stream=log) as progress:
        clock.now += 30
        progress.advance(4)
        raise RuntimeError("interrupted")
    assert log.getvalue().splitlines()[-1] == "slow: stopped after 4/10 images (30 s)"


def test_a_terminal_gets_a_bar(clock):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with Progress("frozen features", total=8, stream=screen) as progress:
        progress.advance(8)
    drawn = screen.getvalue()
    assert drawn.startswith("\rfrozen features:") and "0/8 [" in drawn  # tqdm's bar, redrawn in place
    assert "images in" not in drawn  # no log line beside the bar
