"""What kind of thing a MODEL argument names: a path (file, folder, something else) or a name."""

from __future__ import annotations

import os
from pathlib import Path

from yi_local.errors import YiLocalError


def as_path(spec: str) -> Path:
    try:
        return Path(spec).expanduser()
    except RuntimeError:  # ~user of no such user
        return Path(spec)


def path_kind(path: Path) -> str | None:
    """'file', 'dir', 'other' (a device, a socket...) or None (missing, or a name the file system refuses)."""
    try:
        return "file" if path.is_file() else "dir" if path.is_dir() else "other" if path.exists() else None
    except (OSError, ValueError):
        return None


def not_special(spec: str, kind: str | None) -> None:
    if kind == "other":
        raise YiLocalError(f"{spec} is neither a file nor a folder", hint="give a .gguf file, a model folder or a model name")


def looks_like_path(spec: str) -> bool:
    """A file system path (that does not exist), rather than a model name or an org/name repo id."""
    return spec.startswith((".", "~", os.sep)) or spec.count("/") > 1
