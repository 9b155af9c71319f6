"""Download what conversion needs from the Hugging Face hub (or the mirror HF_ENDPOINT names).

huggingface-hub does the transfer: progress bars, HF_TOKEN, resuming a cut download with Range
requests. On top of it: only the needed files are fetched (weights in one format, config and
tokenizer files), every file is checked against the hub's checksums (sha256 for LFS files), and
hub errors become messages that say what to do.

Several commands may use one download at once (two pulls of different quantizations of a model): each
holds a shared lock on it while it does (`using_download`), and `release_download` deletes it only when
it gets the lock alone, so never under another process's feet, and never when a user asked to keep it.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from yi_local.errors import YiLocalError
from yi_local.locks import Users
from yi_local.paths import ensure_dir, home
from yi_local.store import slug

CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json"]  # fmt: skip
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
# In a download folder: some command was asked to keep it (--keep-source, or the transformers backend's copy).
KEEP_MARKER = ".yi-local-keep"


@dataclass(frozen=True)
class Download:
    path: Path
    revision: str | None  # the commit downloaded (None when taken from disk offline)


def downloads_dir() -> Path:
    return home() / "downloads"


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_path(repo: str) -> Path:
    return downloads_dir() / slug(repo)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def download(repo: str, revision: str = "main") -> Download:
    """Fetch `repo`'s config, tokenizer and weights into the downloads folder (resuming what is there)."""
    local = download_path(repo)
    if offline():
        if (local / "config.json").is_file():
            return Download(local, None)
        raise YiLocalError(
            f"{repo} is not downloaded and the hub is off (HF_HUB_OFFLINE is set)",
            hint=f"unset HF_HUB_OFFLINE and run `yi-local pull {repo}` while online",
        )
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    with _hub_errors(repo):
        info = api.model_info(repo, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        weights = SAFETENSORS if any(f.endswith(".safetensors") for f in files) else PYTORCH_BIN
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise YiLocalError(f"{repo} has no weights (neither *.safetensors nor pytorch_model*.bin)",
                               hint="is this a model repository? quantized-only repos (AWQ/GPTQ/GGUF) cannot be converted")  # fmt: skip
        ensure_dir(local)
        snapshot_download(repo, revision=info.sha, local_dir=local, allow_patterns=CONFIG_FILES + weights)
        verification = api.verify_repo_checksums(repo, revision=info.sha, local_dir=local)
    if verification.mismatches:
        for mismatch in verification.mismatches:
            (local / mismatch["path"]).unlink(missing_ok=True)
        names = ", ".join(m["path"] for m in verification.mismatches)
        raise YiLocalError(
            f"the download of {repo} is corrupt: {names} did not match the hub's checksum (deleted)",
            hint=f"run `yi-local pull` again to fetch {'it' if len(verification.mismatches) == 1 else 'them'} anew",
        )
    return Download(local, info.sha)


def remove_download(path: Path) -> int:
    """Delete a download folder; the bytes freed."""
    size = folder_size(path) if path.is_dir() else 0
    shutil.rmtree(path, ignore_errors=True)
    return size


def _users(repo: str) -> Users:
    return Users(f"download-{slug(repo)}")


def using_download(repo: str):
    """A context: while inside, this process needs `repo`'s download, and `release_download` leaves it."""
    return _users(repo).using()


def keep_download(path: Path) -> None:
    """Mark a download as wanted: `release_download` keeps it from now on."""
    if path.is_dir():
        (path / KEEP_MARKER).touch()


def release_download(repo: str) -> int:
    """Delete `repo`'s download unless a command is using it or one asked to keep it; the bytes freed."""
    path = download_path(repo)
    with _users(repo).alone() as alone:
        if not alone or not path.is_dir() or (path / KEEP_MARKER).exists():
            return 0  # the last command to finish with it removes it
        return remove_download(path)


class _hub_errors:
    """Turn huggingface-hub and network exceptions into YiLocalError with a fix."""

    def __init__(self, repo: str):
        self.repo = repo

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, YiLocalError):
            return False
        from huggingface_hub import errors

        where = endpoint()
        token_hint = "set HF_TOKEN to a token that can read it" + ("" if os.environ.get("HF_TOKEN") else " (none is set)")
        if isinstance(exc, errors.GatedRepoError):
            raise YiLocalError(f"{self.repo} is gated on {where}", hint=f"accept its terms on the hub, then {token_hint}") from None
        if isinstance(exc, errors.RepositoryNotFoundError):
            raise YiLocalError(f"there is no repository {self.repo} on {where}",
                               hint=f"check the name; for a private repository {token_hint}") from None  # fmt: skip
        if isinstance(exc, errors.RevisionNotFoundError):
            raise YiLocalError(f"{self.repo} has no such revision", hint="check the revision name") from None
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise YiLocalError(f"could not write the download of {self.repo} in {download_path(self.repo)} "
                               f"({exc.strerror})", hint="free some space there, or set YI_LOCAL_HOME to "
                               "another disk; the pull resumes where it stopped when run again") from None  # fmt: skip
        if isinstance(exc, (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError)) or "httpx" in type(exc).__module__:
            raise YiLocalError(
                f"could not download {self.repo} from {where} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                hint="check the network; where the hub is slow or blocked, set HF_ENDPOINT to a mirror. "
                "A pull that was cut off resumes where it stopped when run again",
            ) from None
        return False
