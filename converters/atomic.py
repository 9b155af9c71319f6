"""Write files that matter under a temporary name and rename them into place."""

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
