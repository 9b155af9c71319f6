"""Terminal progress bars (rich) for the library's `Progress` protocol."""

from __future__ import annotations

import sys

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class _Amount(ProgressColumn):
    """Sizes and a transfer speed for a task counting bytes; "12/345 tokens" for one counting anything else."""

    def __init__(self) -> None:
        super().__init__()
        self._size, self._speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return Text.assemble(self._size.render(task), " ", self._speed.render(task))
        return Text(f"{int(task.completed):,}/{int(task.total or 0):,} {unit}", style="progress.download")


class _RichTask:
    def __init__(self, bars: Progress, task_id) -> None:
        self._bars, self._id = bars, task_id

    def advance(self, n: int) -> None:
        self._bars.advance(self._id, n)

    def update(self, completed: int) -> None:
        self._bars.update(self._id, completed=completed)

    def close(self) -> None:
        task = self._bars.tasks[self._id]
        self._bars.update(self._id, completed=task.total)


class TerminalProgress:
    """Bars on stderr, one per task; silent when stderr is not a terminal unless forced."""

    def __init__(self, enabled: bool | None = None, unit: str = "bytes") -> None:
        """`unit`: what tasks count unless they say (bytes get sizes and a transfer speed, others "12/345 tokens")."""
        from rich.console import Console

        console = Console(stderr=True)
        self._unit = unit
        self._bars = Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            _Amount(),
            TimeRemainingColumn(),
            console=console,
            disable=not (enabled if enabled is not None else sys.stderr.isatty()),
        )

    def __enter__(self) -> "TerminalProgress":
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def task(self, label: str, total: int, unit: str | None = None) -> _RichTask:
        return _RichTask(self._bars, self._bars.add_task(label, total=total, unit=unit or self._unit))
