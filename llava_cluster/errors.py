"""One exception type for mistakes a user can fix: the CLI prints its message, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A bad input (path, spec, data, flag). `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
