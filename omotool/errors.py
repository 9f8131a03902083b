"""The errors omotool explains to its users.

Library code raises these where the problem can be named; the CLI turns them into a short
message and the exit code below, in one place (``omotool.cli``). Anything else is a bug.
"""


class OmoError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""

    exit_code = 1


class UsageError(OmoError):
    """Options that do not fit together or are out of range (exit code 2, as click's)."""

    exit_code = 2


class InputError(OmoError):
    """An input that cannot be used: missing path, not a model, malformed or mismatched file."""


class OutputError(OmoError):
    """An output that cannot be written: exists already, disk full, no permission."""
