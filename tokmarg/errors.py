"""The one base class of the errors a user can fix: bad input, a run that cannot continue.

Each module raises its own subclass with a one-line message naming the file, line, key or
option; the CLI turns any of them into ``error: <message>`` and exit code 2, no traceback.
"""


class TokmargError(Exception):
    """A problem the user can fix; ``str(e)`` is one line that says what and where."""
