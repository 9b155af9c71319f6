"""Write files that matter under a temporary name and rename them into place.

THE one place yi-local writes files atomically: model files (`atomic_output`), small JSON files
(`write_atomic`) and scratch files (`scratch_file`). It sits at the bottom of the package, so the
store, the chat and the converters share it.

Temporary files and folders are created exclusively in the target folder (`mkstemp`/`mkdtemp`:
O_EXCL, never through a symlink) and hold an flock for as long as they exist. A temporary that no
process holds a lock on belongs to a run that died (SIGKILL, a llama.cpp abort) and is removed by the
next write in that folder; a pid in the name would prove nothing, pids are reused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from yi_local.errors import YiLocalError
from yi_local.units import format_size

TEMP_SUFFIX = ".yi-part"  # a temporary file
TEMP_DIR_SUFFIX = ".yi-partdir"  # a private folder for a file llama.cpp writes by name

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def check_writable(final: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse to write `final` over a file that exists (without `force`), a special file, or an input.

    Temporaries that killed runs left in its folder are removed first, even when the write is refused."""
    remove_stale(final.parent)
    try:
        st = os.stat(final)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _os_error(e, final) from None
    for src in inputs:
        if os.path.lexists(final) and _same_file(final, src):
            raise YiLocalError(
                f"{final} is the input {src}",
                hint="writing there would destroy the input (--force or not): choose another -o",
            )
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise YiLocalError(f"{final} is a folder", hint="choose another -o, or give the folder itself as -o")
    if not stat.S_ISREG(st.st_mode):
        raise YiLocalError(f"{final} is not a regular file", hint="yi-local only writes regular files: choose another -o")
    if not force:
        raise YiLocalError(f"{final} already exists", hint="pass --force to overwrite it, or choose another -o")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b) or os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_room(needs: dict[Path, int]) -> None:
    """Refuse to start when a folder in `needs` (folder -> bytes to write there) cannot be written or lacks the space.

    Found here, before hours of work, rather than by the last write. Folders that do not exist yet are
    judged by the nearest one that does (where they will be made).
    """
    per_device: dict[int, tuple[Path, int]] = {}
    for folder, n in needs.items():
        existing = _existing_ancestor(folder)
        if not existing.is_dir():
            raise YiLocalError(f"cannot write in {folder}: {existing} is not a folder", hint="choose another -o")
        try:
            with _locked_temp(existing, "write-test"):
                pass
        except OSError as e:
            raise _os_error(e, folder) from None
        dev = os.stat(existing).st_dev
        where, total = per_device.get(dev, (folder, 0))
        per_device[dev] = (where, total + n)
    for where, total in per_device.values():
        free = shutil.disk_usage(_existing_ancestor(where)).free
        if free < total:
            raise YiLocalError(
                f"not enough free space in {where}: this needs about {format_size(total)} there, {format_size(free)} are free",
                hint="free some space, or write elsewhere with -o",
            )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def remove_stale(folder: Path) -> None:
    """Remove the temporaries in `folder` that no live process holds: what killed runs left behind."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    uid = os.getuid()
    for entry in entries:
        is_dir = entry.name.endswith(TEMP_DIR_SUFFIX)
        if not entry.name.startswith(".") or not (is_dir or entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != uid or not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if is_dir else 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(entry.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                # Removed while locked, so a run that created it a moment ago sees it gone and makes another.
                shutil.rmtree(entry.path) if is_dir else os.unlink(entry.path)
        except OSError:
            pass  # locked by a live run, or not ours to remove
        finally:
            os.close(fd)


@contextmanager
def _locked_temp(folder: Path, name: str, directory: bool = False) -> Iterator[tuple[Path, int]]:
    """A new temporary file (or folder) in `folder`, locked until the block ends, then removed if still there."""
    remove_stale(folder)
    while True:
        if directory:
            path = tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMP_DIR_SUFFIX, dir=folder)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        else:
            fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # another run's cleanup took it before the lock: make another
    try:
        yield Path(path), fd
    finally:
        try:
            if directory:
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


@contextmanager
def atomic_output(final: Path, force: bool = False, durable: bool = True, private_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` if the block succeeds.

    On any failure, Ctrl+C and SIGTERM included, the temporary is removed and `final` is untouched.
    `durable=False` skips the fsync, for scratch files that are deleted after use. `private_dir=True`
    yields a path inside a new folder only this user can enter, for a writer that opens the path by
    name itself (llama.cpp's quantizer).
    """
    check_writable(final, force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked_temp(final.parent, final.name, directory=private_dir) as (tmp, fd):
            path = tmp / final.name if private_dir else tmp
            if not private_dir:
                os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a model file is as readable as any new file
            yield path
            if durable:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(path, final)
        if durable:
            _fsync_folder(final.parent)
    except OSError as e:
        raise _os_error(e, final) from None


@contextmanager
def scratch_file(folder: Path, name: str) -> Iterator[Path]:
    """A temporary file in `folder` (named after `name`) for the block's use, removed afterwards."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked_temp(folder, name) as (tmp, _):
            yield tmp
    except OSError as e:
        raise _os_error(e, folder / name) from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is done either way
    finally:
        os.close(fd)


def _os_error(e: OSError, final: Path) -> Exception:
    """An OSError while writing `final`, as a message that says what to do (or `e` itself)."""
    if e.errno in _FULL:
        free = shutil.disk_usage(_existing_ancestor(final.parent)).free
        return YiLocalError(
            f"could not write {final}: {os.strerror(e.errno)} ({format_size(free)} free there)",
            hint="free some space or write elsewhere with -o; nothing was written",
        )
    where = Path(os.fsdecode(e.filename)).absolute().parent if e.filename else final.absolute().parent
    ours = where in (final.absolute().parent, *final.absolute().parents) or where.parent == final.absolute().parent
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT) and ours:  # not an input that went missing
        return YiLocalError(f"cannot write in {where}: {os.strerror(e.errno).lower()}",
                            hint="write somewhere you have permission to (-o)")  # fmt: skip
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and e.filename is not None:
        blocker = _file_in_the_way(final)
        if blocker is not None:
            return YiLocalError(f"cannot write {final}: {blocker} is not a folder", hint="choose another -o")
    return e


def _file_in_the_way(final: Path) -> Path | None:
    for parent in final.absolute().parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def write_atomic(final: Path, data: bytes | str) -> None:
    """Replace `final` with `data` (str is written as UTF-8): the old file or the new one, never half of either."""
    with atomic_output(final, force=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
