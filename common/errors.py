"""The one exception type a medfed user is meant to read.

Anything raised as `MedfedError` is printed by the CLI as a single line (what is wrong and
what to do) with a non-zero exit; anything else is a bug and keeps its traceback.
"""


class MedfedError(Exception):
    """A problem with the user's input or environment, worded for the user."""
