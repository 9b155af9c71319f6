"""Locks between yi-local processes (filelock) that say who holds them.

The OS releases a lock with the process that held it, so a crashed or killed run never leaves one
held. The holder writes its pid and what it is doing into the lock file, so a second process can say
whom it is waiting for (the pid only informs: liveness is the OS lock's business, and pids are reused).
"""

from __future__ import annotations

import logging
import os

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


class _lock_errors:
    """A lock file that cannot be created (read-only or full disk) is a YiLocalError naming it."""

    def __init__(self, path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, OSError) and not isinstance(exc, Timeout):
            raise YiLocalError(f"cannot create the lock file {self.path} ({exc.strerror or exc})",
                               hint="check that its folder is writable and the disk not full") from None  # fmt: skip
        return False
