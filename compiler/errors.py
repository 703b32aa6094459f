"""The one exception type that reaches users.

Every failure caused by what a user handed us (a file, a flag, a model) is raised as
`EpcError` with a message that names the file / node / op and says what is supported.
The CLI prints it as a single `epc: error: ...` line and exits with status 2; anything
else escaping is a bug in epc.
"""
from __future__ import annotations


class EpcError(Exception):
    """A user-facing error: the message is complete and is printed as is."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class IRSyntaxError(EpcError):
    """A textual IR that does not parse; carries the line and column."""

    def __init__(self, message: str, *, source: str, line: int, col: int):
        self.line, self.col = line, col
        super().__init__(f"{source}:{line}:{col}: {message}")
