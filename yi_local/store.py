"""The model store: one folder per model under $YI_LOCAL_HOME/models, its GGUFs and a manifest.

A GGUF is written under a temporary name and renamed into place, then recorded in `manifest.json`
(also replaced atomically); only files the manifest names are listed, so `list` never shows a
half-written model. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from yi_local import __version__
from yi_local.atomic import write_atomic
from yi_local.paths import home

MANIFEST = "manifest.json"


def models_dir() -> Path:
    return home() / "models"


def slug(repo: str) -> str:
    """A folder name for a repo id: 01-ai/Yi-6B-Chat -> 01-ai--Yi-6B-Chat."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", repo.replace("/", "--"))


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


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))


def list_models() -> list[StoredModel]:
    root = models_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        manifest = _read_manifest(folder)
        if not manifest:
            continue
        for quant, info in sorted(manifest.get("files", {}).items()):
            path = folder / info["file"]
            if path.is_file():
                found.append(StoredModel(
                    name=manifest.get("name") or manifest["repo"], repo=manifest["repo"], quant=quant, path=path,
                    size=path.stat().st_size, context=int(manifest.get("context", 0)), chat=bool(manifest.get("chat")),
                    revision=manifest.get("revision"), sha256=info.get("sha256", ""),
                    options=info.get("options", {}),
                ))  # fmt: skip
    return found


def find(repo: str, quant: str) -> StoredModel | None:
    for model in list_models():
        if model.repo.lower() == repo.lower() and model.quant == quant:
            return model
    return None


def model_folder(repo: str) -> Path:
    return models_dir() / slug(repo)


def record(repo: str, name: str | None, quant: str, gguf: Path, *, revision: str | None, context: int,
           chat: bool, options: dict) -> StoredModel:  # fmt: skip
    """Add `gguf` (already renamed into place inside `model_folder(repo)`) to the manifest."""
    folder = gguf.parent
    manifest = _read_manifest(folder) or {"repo": repo, "files": {}}
    manifest.update(name=name, repo=repo, revision=revision, context=context, chat=chat, yi_local_version=__version__)
    digest = sha256_file(gguf)
    manifest["files"][quant] = {"file": gguf.name, "sha256": digest, "size": gguf.stat().st_size,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": options}  # fmt: skip
    _write_manifest(folder, manifest)
    return StoredModel(name or repo, repo, quant, gguf, gguf.stat().st_size, context, chat, revision, digest, options)


def remove(model: StoredModel) -> None:
    folder = model.path.parent
    manifest = _read_manifest(folder)
    if manifest is not None:
        manifest.get("files", {}).pop(model.quant, None)
        if manifest.get("files"):
            _write_manifest(folder, manifest)
        else:
            (folder / MANIFEST).unlink(missing_ok=True)
    model.path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
