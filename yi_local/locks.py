"""Locks between yi-local processes, from filelock: `Lock` (one holder, who says who it is) and `Users`
(many users of one thing, and a way to act only when there are none).

The OS releases a lock with the process that held it, so a crashed or killed run never leaves one
held. A `Lock` holder writes its pid and what it is doing into the lock file, so a second process can
say whom it is waiting for (the pid only informs: liveness is the OS lock's business, pids are reused).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from filelock import FileLock, Timeout

from yi_local.errors import YiLocalError
from yi_local.paths import locks_dir

logger = logging.getLogger(__name__)


class Lock:
    """An exclusive lock named `name` under the locks folder; `doing` describes this process to others."""

    def __init__(self, name: str, doing: str):
        self.path = locks_dir() / f"{name}.lock"
        self.doing = doing
        self._lock = FileLock(self.path, thread_local=False, on_acquired=self._record)

    def _record(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.doing}".encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as its holder described itself: 'pid 123: yi-local chat'."""
        try:
            pid, _, doing = self.path.read_bytes().decode("utf-8", "replace").partition(" ")
        except OSError:
            pid, doing = "", ""
        return f"pid {pid}: {doing}" if pid.isdigit() and doing else "another process"

    def try_acquire(self) -> bool:
        try:
            with _lock_errors(self.path):
                self._lock.acquire(blocking=False)
        except Timeout:
            return False
        return True

    def acquire(self, waiting: str | None = None) -> None:
        """Wait for the lock; when another process holds it, log `waiting` and whom we wait for first."""
        if self.try_acquire():
            return
        if waiting:
            logger.warning("%s (held by %s)…", waiting, self.holder())
        with _lock_errors(self.path):
            self._lock.acquire()

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Users:
    """Processes that use one thing at once (a download), and a way to act only when none does."""

    def __init__(self, name: str):
        from filelock import ReadWriteLock  # SQLite's locks, which the OS also releases with the process

        self.path = locks_dir() / f"{name}.db"
        with _lock_errors(self.path):
            self._lock = ReadWriteLock(self.path)

    @contextmanager
    def using(self) -> Iterator[None]:
        """While inside, this process is a user: `alone()` elsewhere yields False."""
        with _lock_errors(self.path):
            self._lock.acquire_read()
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def alone(self) -> Iterator[bool]:
        """True when no process is a user; new users wait until the block ends. Never waits itself."""
        try:
            with _lock_errors(self.path):
                self._lock.acquire_write(blocking=False)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()


class _lock_errors:
    """A lock file that cannot be created or used (read-only or full disk) is a YiLocalError naming it."""

    def __init__(self, path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        import sqlite3

        if isinstance(exc, (OSError, sqlite3.Error)) and not isinstance(exc, Timeout):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise YiLocalError(f"cannot use the lock file {self.path} ({reason})",
                               hint="check that its folder is writable and the disk not full") from None  # fmt: skip
        return False
