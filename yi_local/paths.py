"""Where yi-local keeps its files: `YI_LOCAL_HOME`, else the platform's user data folder."""

from __future__ import annotations

import os
from pathlib import Path

from yi_local.errors import YiLocalError

HOME_ENV = "YI_LOCAL_HOME"


def home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        path = Path(env).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise YiLocalError(f"{HOME_ENV}={env} is a file, not a folder",
                               hint=f"point {HOME_ENV} at a folder (it is created when missing), or unset it")  # fmt: skip
        return path
    import platformdirs

    return Path(platformdirs.user_data_dir("yi-local", appauthor=False))


def ensure_dir(path: Path) -> Path:
    """Create `path` (and its parents) if needed; a YiLocalError naming it when that is not possible."""
    if path.exists() and not path.is_dir():
        raise YiLocalError(f"{path} is a file, not a folder",
                           hint=f"move that file away, or set {HOME_ENV} to another folder")  # fmt: skip
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise YiLocalError(f"cannot create the folder {path} ({e.strerror or e})",
                           hint=f"check that it is not a file and that you may write there, or set {HOME_ENV} "
                           "to another folder") from None  # fmt: skip
    return path


def locks_dir() -> Path:
    """Lock files: never deleted while in use, so they live apart from the folders they guard."""
    return ensure_dir(home() / "locks")
