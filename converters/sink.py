"""Where tensor data goes: O_DIRECT writes in page-aligned blocks, or plain buffered writes.

Writing gigabytes through the page cache costs the kernel seconds of CPU (allocating and reclaiming
cache pages) that the conversion needs; direct I/O sends the blocks straight to the disk. Where the
file system refuses O_DIRECT (tmpfs, macOS), the plain buffered path is used.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path
from typing import BinaryIO, Protocol

logger = logging.getLogger(__name__)

BLOCK = 4096
STAGING = 32 << 20


class Sink(Protocol):
    def write(self, data: memoryview) -> None: ...

    def close(self) -> None: ...


class BufferedSink:
    def __init__(self, f: BinaryIO):
        self._f = f

    def write(self, data: memoryview) -> None:
        self._f.write(data)

    def close(self) -> None:
        self._f.flush()


class DirectSink:
    """Appends to `path` from byte `offset` on, through a page-aligned staging buffer."""

    def __init__(self, path: Path, offset: int):
        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self._buf = mmap.mmap(-1, STAGING)  # anonymous mappings are page-aligned
        self._view = memoryview(self._buf)
        self._pos = offset // BLOCK * BLOCK
        with open(path, "rb") as f:  # the header's last partial block is rewritten with the first data
            f.seek(self._pos)
            head = f.read(offset - self._pos)
        self._view[: len(head)] = head
        self._fill = len(head)

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" else data
        while len(data):
            n = min(len(data), STAGING - self._fill)
            self._view[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == STAGING:
                self._flush_blocks()

    def _flush_blocks(self) -> None:
        whole = self._fill // BLOCK * BLOCK
        if whole:
            try:
                written = os.pwrite(self._fd, self._view[:whole], self._pos)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                written = -1
            if written != whole:
                # Direct I/O refused or cut the write short (a full disk or a file size limit shows up
                # like this): go on through the page cache, which reports the real error if there is one.
                self._fall_back_to_buffered()
                self._write_all(self._view[:whole], self._pos)
        self._pos += whole
        rest = self._fill - whole
        self._view[:rest] = self._view[whole : self._fill]
        self._fill = rest

    def _fall_back_to_buffered(self) -> None:
        os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY)

    def _write_all(self, data: memoryview, pos: int) -> None:
        while len(data):
            n = os.pwrite(self._fd, data, pos)
            data, pos = data[n:], pos + n

    def close(self) -> None:
        try:
            self._flush_blocks()
            if self._fill:  # the last partial block goes through the page cache
                with open(self._path, "r+b") as f:
                    f.seek(self._pos)
                    f.write(self._view[: self._fill])
        finally:
            os.close(self._fd)
            try:
                self._view.release()
                self._buf.close()
            except BufferError:  # slices still referenced by an exception in flight; GC frees them
                pass


def open_sink(f: BinaryIO, path: Path, direct: bool = True) -> Sink:
    """A direct sink appending after what `f` has written, else a buffered one on `f`."""
    f.flush()
    if not direct or not hasattr(os, "O_DIRECT") or os.environ.get("YI_LOCAL_NO_DIRECT_IO"):
        return BufferedSink(f)
    try:
        sink = DirectSink(path, f.tell())
        # Probe: some file systems accept the open but refuse the write.
        sink._flush_blocks()
        return sink
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        logger.debug("direct I/O unavailable for %s (%s); using buffered writes", path, e)
        return BufferedSink(f)
