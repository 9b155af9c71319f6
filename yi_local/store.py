"""The model store: one folder per model under $YI_LOCAL_HOME/models, its GGUFs and a manifest.

A GGUF is written under a temporary name and renamed into place, then recorded in `manifest.json`
(also replaced atomically, read-modify-write under a lock); only files the manifest names are listed,
so `list` never shows a half-written model. A manifest is trusted only as far as it is checked: it must
sit in its repo's own folder, and every file it names must be a .gguf inside that folder. Anything else
is ignored with a warning, so a hand-edited or hostile manifest can neither crash a command, claim
another model's name, nor make `rm` delete a file outside the store. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from yi_local import __version__
from yi_local.atomic import write_atomic
from yi_local.catalog import BY_REPO
from yi_local.errors import YiLocalError
from yi_local.locks import Lock
from yi_local.paths import HOME_ENV, ensure_dir, home

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def models_dir() -> Path:
    return home() / "models"


def slug(repo: str) -> str:
    """A folder name for a repo id: 01-ai/Yi-6B-Chat -> 01-ai--Yi-6B-Chat (a long one cut, with a hash)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", repo.replace("/", "--"))
    if len(name) > 200:  # a local folder's name: room for the lock files' prefixes within 255 bytes
        name = f"{name[:180]}-{hashlib.sha256(repo.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return name


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredModel:
    name: str  # the catalog name, or the repo id
    repo: str
    quant: str
    path: Path
    size: int
    context: int
    chat: bool
    revision: str | None
    sha256: str
    options: dict  # how it was made: quantization, conversion options, a local source's signature

    @property
    def full_name(self) -> str:
        return f"{self.name}:{self.quant.lower()}"


def display_name(repo: str) -> str:
    """The catalog name for a catalog repo, else the repo id: never what a manifest claims."""
    entry = BY_REPO.get(repo.lower())
    return entry.name if entry else repo


# -- locks ----------------------------------------------------------------------------------------
def repo_lock(repo: str, doing: str) -> Lock:
    """Held while a model is downloaded and converted into the store: one pull of a model at a time."""
    return Lock(f"repo-{slug(repo)}", doing)


def _manifest_lock(folder: Path) -> Lock:
    """Held for each read-modify-write of a manifest (seconds at most, unlike the repo lock)."""
    return Lock(f"manifest-{folder.name}", "a yi-local store update")


# -- reading manifests ----------------------------------------------------------------------------
_warned: set[str] = set()


def _warn(manifest: Path, problem: str, fix: str = "fix or delete that file") -> None:
    """Say once per process (one command) that part of a manifest is ignored, and why."""
    message = f"warning: ignoring {problem} in {manifest}: {fix}"
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


class _Bad(Exception):
    pass


_KINDS = {dict: "an object", str: "text", int: "a whole number", bool: "true or false"}


def _expect(value, kind: type, what: str, optional: bool = False):
    """`value` if it is a `kind` (None too when `optional`; `...` is missing); else _Bad saying what is wrong."""
    if value is None and optional:
        return None
    if value is ...:
        raise _Bad(f"a manifest without {what}")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Bad(f"a manifest whose {what} is {json.dumps(value)[:60]}, not {_KINDS[kind]}")
    return value


def _read_manifest(folder: Path) -> dict | None:
    """The manifest's JSON, or None when the folder has none (or it is not readable JSON, with a warning)."""
    path = folder / MANIFEST
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(path, f"an unreadable manifest ({e.strerror or e})")
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _warn(path, f"a manifest that is not JSON ({str(e)[:80]})")
    return None


def _inside(folder: Path, name: str) -> Path:
    """`folder / name` when `name` is a plain .gguf file name that resolves inside `folder` (no symlink out)."""
    if Path(name).name != name or name in (".", "..") or "\0" in name or not name.endswith(".gguf"):
        raise _Bad(f"the file {name[:200]!r} (only a .gguf file name inside {folder} is allowed)")
    candidate = folder / name
    try:
        inside = candidate.resolve(strict=False).is_relative_to(folder.resolve(strict=True))
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise _Bad(f"the file {name[:200]!r} (it leads outside {folder})")
    return candidate


def _models_in(folder: Path, manifest) -> list[StoredModel]:
    """The models a manifest lists, each checked; problems are warned about and skip what they concern."""
    where = folder / MANIFEST
    try:
        _expect(manifest, dict, "content")
        repo = _expect(manifest.get("repo", ...), str, "'repo'")
        if slug(repo) != folder.name:
            raise _Bad(f"a manifest for {repo[:200]!r} outside that model's folder ({slug(repo)[:200]})")
        entry = BY_REPO.get(repo.lower())
        if entry is not None and entry.repo != repo:  # pulls write the catalog's spelling: one folder per model
            raise _Bad(f"a manifest for {repo[:200]!r}, the catalog's {entry.repo} in other letter case")
        files = _expect(manifest.get("files", ...), dict, "'files'")
        context = _expect(manifest.get("context", ...), int, "'context'")
        chat = _expect(manifest.get("chat", False), bool, "'chat'")
        revision = _expect(manifest.get("revision"), str, "'revision'", optional=True)
        if context < 0:
            raise _Bad(f"a manifest whose 'context' is negative ({context})")
    except _Bad as e:
        _warn(where, str(e))
        return []
    found = []
    for quant, info in sorted(files.items()):
        try:
            key = f"files.{quant[:40]}"
            _expect(info, dict, key)
            name = _expect(info.get("file", ...), str, f"{key}.file")
            sha256 = _expect(info.get("sha256", ""), str, f"{key}.sha256")
            options = _expect(info.get("options", {}), dict, f"{key}.options")
            path = _inside(folder, name)
            if not path.is_file():
                continue  # recorded, then deleted by hand: not there
            size = path.stat().st_size
        except _Bad as e:
            _warn(where, str(e))
            continue
        except OSError:
            continue
        found.append(StoredModel(display_name(repo), repo, quant, path, size, context, chat, revision, sha256, options))
    return found


def _folders() -> list[Path]:
    root = models_dir()
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise YiLocalError(f"the model store {root} is a file, not a folder",
                           hint=f"move that file away, or set {HOME_ENV} to another folder") from None  # fmt: skip
    except OSError as e:
        raise YiLocalError(f"cannot read the model store {root} ({e.strerror or e})",
                           hint=f"check its permissions, or set {HOME_ENV} to another folder") from None  # fmt: skip
    folders = []
    for p in entries:
        if p.is_symlink() and (p / MANIFEST).exists():
            _warn(p / MANIFEST, f"a model folder that is a symlink to {os.path.realpath(p)}",
                  "move the folder itself into the store, which deletes nothing outside itself")  # fmt: skip
        elif p.is_dir() and not p.is_symlink():
            folders.append(p)
    return folders


def list_models() -> list[StoredModel]:
    found = []
    for folder in _folders():
        manifest = _read_manifest(folder)
        if manifest is not None:
            found += _models_in(folder, manifest)
    return found


def find(repo: str, quant: str) -> StoredModel | None:
    for model in list_models():
        if model.repo.lower() == repo.lower() and model.quant == quant:
            return model
    return None


def model_folder(repo: str) -> Path:
    return models_dir() / slug(repo)


def _own_manifest(folder: Path) -> dict | None:
    """The folder's manifest when it is one this store can update: an object with this folder's repo and files."""
    manifest = _read_manifest(folder)
    if isinstance(manifest, dict) and isinstance(manifest.get("repo"), str) and slug(manifest["repo"]) == folder.name \
            and isinstance(manifest.get("files"), dict):  # fmt: skip
        return manifest
    return None


# -- writing ---------------------------------------------------------------------------------------
def _write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))


def _writable_manifest(folder: Path, repo: str) -> dict:
    """The manifest to update: the current one (`prepare_folder` refused a damaged one), or a new one."""
    return _own_manifest(folder) or {"repo": repo, "files": {}}


def record(repo: str, name: str | None, quant: str, gguf: Path, *, revision: str | None, context: int,
           chat: bool, options: dict) -> StoredModel:  # fmt: skip
    """Add `gguf` (already renamed into place inside `model_folder(repo)`) to the manifest."""
    folder = gguf.parent
    digest = sha256_file(gguf)
    size = gguf.stat().st_size
    with _manifest_lock(folder):
        manifest = _writable_manifest(folder, repo)
        manifest.update(name=name, repo=repo, revision=revision, context=context, chat=chat,
                        yi_local_version=__version__)  # fmt: skip
        manifest["files"][quant] = {"file": gguf.name, "sha256": digest, "size": size,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": options}  # fmt: skip
        _write_manifest(folder, manifest)
    return StoredModel(display_name(repo), repo, quant, gguf, size, context, chat, revision, digest, options)


def remove(model: StoredModel) -> None:
    """Forget `model` and delete its file: only a file its manifest names, checked again under the lock."""
    folder = model_folder(model.repo)
    with _manifest_lock(folder):
        manifest = _read_manifest(folder)
        current = {m.quant: m for m in _models_in(folder, manifest)} if manifest is not None else {}
        entry = current.get(model.quant)
        if entry is None:
            return  # removed meanwhile by another command
        del manifest["files"][model.quant]
        try:
            entry.path.unlink(missing_ok=True)  # first: a file that cannot be deleted stays listed
            if manifest["files"]:
                _write_manifest(folder, manifest)
            else:
                (folder / MANIFEST).unlink(missing_ok=True)
        except OSError as e:
            raise YiLocalError(f"could not remove {model.full_name} from {folder} ({e.strerror or e})",
                               hint="check that the store is writable, then run `yi-local rm` again") from None  # fmt: skip
    # The folder goes with its last model, unless a pull of that model is at work in it.
    lock = repo_lock(model.repo, "yi-local rm")
    if lock.try_acquire():
        try:
            folder.rmdir()
        except OSError:
            pass
        finally:
            lock.release()


def check_folder(repo: str) -> dict | None:
    """The manifest of `repo`'s folder (None when there is none yet); a YiLocalError when it is damaged:
    adding a model would replace it and orphan the models it lists. Writes nothing."""
    folder = model_folder(repo)
    manifest = _own_manifest(folder)
    if manifest is None and (folder / MANIFEST).exists():
        raise YiLocalError(f"the store's manifest {folder / MANIFEST} is damaged, so {repo} cannot be added to it",
                           hint="fix that file, or delete it (the models it lists are then forgotten), "
                           "and pull again")  # fmt: skip
    return manifest


def prepare_folder(repo: str) -> Path:
    """The model's folder, created, without GGUFs a pull left unrecorded when it died before recording them.

    Call it holding `repo_lock(repo)`: then no other pull is writing there. A manifest that cannot be
    updated is a YiLocalError, before any conversion: replacing it would orphan the models it lists.
    """
    folder = ensure_dir(model_folder(repo))
    with _manifest_lock(folder):
        manifest = check_folder(repo)
        files = manifest["files"] if manifest else {}
        recorded = {i["file"] for i in files.values() if isinstance(i, dict) and isinstance(i.get("file"), str)}
        for leftover in folder.glob("*.gguf"):
            if leftover.name not in recorded and leftover.is_file() and not leftover.is_symlink():
                leftover.unlink(missing_ok=True)
    return folder
