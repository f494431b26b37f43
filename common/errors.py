"""The one exception type a medfed user is meant to read.

Anything raised as `MedfedError` is printed by the CLI as a single line (what is wrong and
what to do) with a non-zero exit; anything else is a bug and keeps its traceback.
"""


class MedfedError(Exception):
    """A problem with the user's input or environment, worded for the user."""


def few(items, *, shown: int = 5) -> str:
    """`a, b, c, d, e and 9,995 more`: a list short enough for a one-line message."""
    items = [str(item) for item in items]
    if len(items) <= shown + 1:
        return ", ".join(items)
    return f"{', '.join(items[:shown])} and {len(items) - shown:,} more"
