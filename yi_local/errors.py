"""The one exception type yi-local raises for problems a user can fix.

This module imports nothing, so every layer (converters included) can raise it.
"""


class YiLocalError(Exception):
    """A problem with the user's input or environment; the message says how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  {self.hint}" if self.hint else self.message


class UnavailableError(YiLocalError):
    """Something the request needs is not there now (a worker machine stopped answering): not the
    request's fault, and it may work later. The server answers 503."""
