"""How a command's error reaches the user: one line on stderr and an exit code, no traceback."""

from __future__ import annotations

from typing import NoReturn

import typer

# What a command says when Ctrl-C (or SIGTERM) stopped it and its processes are gone.
INTERRUPTED = "interrupted; nothing is left running"


def fail(exc: Exception, *, code: int) -> NoReturn:
    """The user sees one line, never a traceback: 2 = bad input, 1 = a run that failed."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code) from None
