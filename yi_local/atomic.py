"""Write files that matter under a temporary name and rename them into place.

The one place yi-local writes files atomically: model files (`atomic_output`) and small JSON files
(`write_atomic`). It sits at the bottom of the package, so the store, the chat and the converters share it.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from yi_local.errors import YiLocalError


def check_writable(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise YiLocalError(f"{final} already exists", hint="pass --force to overwrite it, or choose another -o")


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.part")


@contextmanager
def atomic_output(final: Path, force: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` if the block succeeds.

    On any failure, Ctrl+C included, the temporary file is removed and `final` is untouched.
    `durable=False` skips the fsync, for scratch files that are deleted after use.
    """
    check_writable(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = shutil.disk_usage(final.parent).free
            raise YiLocalError(
                f"could not write {final}: {os.strerror(e.errno)} ({free / 1e9:.1f} GB free there)",
                hint="free some space or write elsewhere with -o; nothing was written",
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(final: Path, data: bytes | str) -> None:
    """Replace `final` with `data` (str is written as UTF-8): the old file or the new one, never half of either."""
    with atomic_output(final, force=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
