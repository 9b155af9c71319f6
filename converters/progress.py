"""How long-running library work reports progress without knowing about terminals."""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int) -> None: ...

    def update(self, completed: int) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, label: str, total: int, unit: str | None = None) -> Task:
        """A bar of `total` `unit`s (None: bytes)."""
        ...


class _NullTask:
    def advance(self, n: int) -> None:
        pass

    def update(self, completed: int) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    def task(self, label: str, total: int, unit: str | None = None) -> Task:
        return _NullTask()
