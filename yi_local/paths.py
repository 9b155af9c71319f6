"""Where yi-local keeps its files: `YI_LOCAL_HOME`, else the platform's user data folder."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "YI_LOCAL_HOME"


def home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("yi-local", appauthor=False))
