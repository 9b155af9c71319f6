"""The store trusts a manifest only as far as it checks out: no file outside a model's folder is listed or
deleted, a manifest cannot answer for another model's name, and a malformed one is skipped with one
warning instead of a traceback in every store command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli
from yi_local import store

REPO_ID = "01-ai/Yi-Tiny-Chat"


def add_model(gguf, repo: str = REPO_ID, quant: str = "Q8_0") -> store.StoredModel:
    """A model stored the way a pull stores it."""
    folder = store.model_folder(repo)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{repo.rsplit('/', 1)[-1]}-{quant}.gguf"
    shutil.copy(gguf, dest)
    return store.record(repo, None, quant, dest, revision="abc", context=4096, chat=True, options={"quant": quant})


def write_manifest(folder_name: str, manifest, files: dict | None = None) -> "os.PathLike":
    folder = store.models_dir() / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    path = folder / "manifest.json"
    path.write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    return path


def good(file: str = "m-Q4_K_M.gguf", **changes) -> dict:
    manifest = {"repo": "evil/model", "context": 4096, "chat": True, "files": {"Q4_K_M": {"file": file, "sha256": ""}}}
    return {**manifest, **changes}


# -- paths out of the folder --------------------------------------------------------------------
def test_rm_never_deletes_outside_the_store(chat_gguf, tmp_path):
    """One manifest, one real model and four entries naming a file outside the store, each some other way."""
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"precious")
    folder = store.model_folder("evil/model")
    up = os.path.relpath(tmp_path, folder)  # ../../.. up to the victim's folder
    escapes = {"Q4_0": f"{up}/victim.gguf", "Q5_0": str(victim), "Q6_K": f"sub/../{up}/victim.gguf", "Q8_0": "link.gguf"}
    manifest = good("m-Q4_K_M.gguf")
    manifest["files"].update({quant: {"file": name} for quant, name in escapes.items()})
    path = write_manifest("evil--model", manifest)
    shutil.copy(chat_gguf, folder / "m-Q4_K_M.gguf")
    (folder / "link.gguf").symlink_to(victim)
    listing = run_cli("list")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    assert str(victim) not in listing.stdout and listing.stdout.count("evil/model") == 1
    for name in escapes.values():
        assert f"warning: ignoring the file {name!r}" in listing.stderr, listing.stderr
    assert listing.stderr.count(str(path)) == len(escapes)
    removed = run_cli("rm", "evil/model", "--yes")  # every quantization of evil/model
    assert removed.returncode == 0 and "Traceback" not in removed.stderr
    assert "removed evil/model:q4_k_m," in removed.stdout and not (folder / "m-Q4_K_M.gguf").exists()
    assert victim.read_bytes() == b"precious"


def test_a_manifest_cannot_claim_another_models_name(chat_gguf):
    """A folder whose manifest says it is 01-ai/Yi-6B-Chat, but which is not that repo's folder."""
    path = write_manifest("impostor", good("Yi-6B-Chat-Q4_K_M.gguf", repo="01-ai/Yi-6B-Chat", name="yi:6b-chat"))
    shutil.copy(chat_gguf, path.parent / "Yi-6B-Chat-Q4_K_M.gguf")
    assert store.list_models() == [] and store.find("01-ai/Yi-6B-Chat", "Q4_K_M") is None
    ran = run_cli("run", "yi:6b-chat", "hi", "--max-tokens", "2")
    assert ran.returncode == 1 and "Traceback" not in ran.stderr and ran.stdout == ""
    assert "yi:6b-chat:q4_k_m is not in the store" in ran.stderr
    assert "outside that model's folder" in ran.stderr and str(path) in ran.stderr


def test_the_name_shown_comes_from_the_repo_not_the_manifest(chat_gguf):
    model = add_model(chat_gguf, repo="someone/Tiny")
    manifest_path = model.path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "yi:34b-chat"
    manifest_path.write_text(json.dumps(manifest))
    [listed] = store.list_models()
    assert listed.name == "someone/Tiny" and listed.full_name == "someone/Tiny:q8_0"


# -- malformed manifests ----------------------------------------------------------------------------
MALFORMED = {
    "a list": [good()],
    "a string": "manifest",
    "files a string": good(files="m-Q4_K_M.gguf"),
    "files a list": good(files=["m-Q4_K_M.gguf"]),
    "no repo": {k: v for k, v in good().items() if k != "repo"},
    "no files": {k: v for k, v in good().items() if k != "files"},
    "context null": good(context=None),
    "context a string": good(context="4096"),
    "context negative": good(context=-1),
    "repo a number": good(repo=5),
    "chat a string": good(chat="yes"),
    "revision a list": good(revision=["x"]),
    "entry a string": good(files={"Q4_K_M": "m-Q4_K_M.gguf"}),
    "file a number": good(files={"Q4_K_M": {"file": 5}}),
    "file missing": good(files={"Q4_K_M": {"sha256": ""}}),
    "options a list": good(files={"Q4_K_M": {"file": "m-Q4_K_M.gguf", "options": []}}),
    "sha256 a dict": good(files={"Q4_K_M": {"file": "m-Q4_K_M.gguf", "sha256": {}}}),
    "not json": b"{\"repo\": ",
    "not utf-8": b"{\"repo\": \"\xff\xfe\"}",
    "nested too deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_skipped_with_a_warning(case, chat_gguf, caplog):
    model = add_model(chat_gguf)
    path = write_manifest("evil--model", MALFORMED[case], {"m-Q4_K_M.gguf": b"GGUF"})
    with caplog.at_level(logging.WARNING, logger="yi_local.store"):
        assert store.list_models() == [model]
        assert store.find(REPO_ID, "Q8_0") == model and store.find("evil/model", "Q4_K_M") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and warnings[0].startswith("warning: ignoring")


def test_store_commands_warn_once_and_never_trace_back(chat_gguf):
    """Every malformed manifest at once: each store command works, naming each bad manifest once."""
    model = add_model(chat_gguf)
    paths = [write_manifest(f"evil-{i}", manifest) for i, manifest in enumerate(MALFORMED.values())]
    for args in (["list"], ["show", f"{REPO_ID}:q8_0"], ["rm", "evil/model", "--yes"]):  # show looks twice
        proc = run_cli(*args)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.returncode == (1 if args[0] == "rm" else 0), (args, proc.stderr)
        for path in paths:
            assert proc.stderr.count(f"{path}:") == 1, (args, path, proc.stderr)
    assert str(model.path) in run_cli("list").stdout


# -- manifest updates -------------------------------------------------------------------------------
RECORD = """
import shutil, sys, time
from pathlib import Path
from yi_local import store
quant, gguf, barrier = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
dest = store.model_folder("01-ai/Yi-Tiny-Chat") / f"Yi-Tiny-Chat-{quant}.gguf"
shutil.copy(gguf, dest)
barrier.with_name(quant).touch()
while not barrier.exists():
    time.sleep(0.002)
store.record("01-ai/Yi-Tiny-Chat", None, quant, dest, revision=None, context=4096, chat=True, options={})
"""


def test_concurrent_manifest_updates_lose_nothing(chat_gguf, tmp_path):
    """Five processes record five quantizations at the same moment: all five are in the manifest."""
    store.model_folder(REPO_ID).mkdir(parents=True)
    big = tmp_path / "big.gguf"  # a few MB, so each record takes a while to hash
    big.write_bytes(chat_gguf.read_bytes() * max(1, (8 << 20) // chat_gguf.stat().st_size))
    barrier = tmp_path / "go"
    quants = ["Q2_K", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"]
    procs = [subprocess.Popen([sys.executable, "-c", RECORD, q, str(big), str(barrier)], cwd=REPO, env=os.environ)
             for q in quants]  # fmt: skip
    deadline = time.monotonic() + 60
    while not all((tmp_path / q).exists() for q in quants):  # all at the barrier
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    barrier.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * len(quants)
    assert sorted(m.quant for m in store.list_models()) == sorted(quants)


def test_a_manifest_in_other_letter_case_cannot_take_a_catalog_name(tmp_path, chat_gguf, caplog):
    """01-AI/Yi-6B-Chat has its own folder (its slug differs in case), but the catalog name belongs to
    the catalog's spelling, the only one pulls write."""
    import json
    import shutil

    from yi_local import store

    for repo in ("01-ai/Yi-6B-Chat", "01-AI/Yi-6B-Chat"):
        folder = store.models_dir() / store.slug(repo)
        folder.mkdir(parents=True)
        shutil.copy(chat_gguf, folder / "m-Q4_K_M.gguf")
        (folder / "manifest.json").write_text(json.dumps(
            {"repo": repo, "context": 4096, "files": {"Q4_K_M": {"file": "m-Q4_K_M.gguf"}}}))  # fmt: skip
    models = store.list_models()
    assert [(m.name, m.repo) for m in models] == [("yi:6b-chat", "01-ai/Yi-6B-Chat")]
    assert store.find("01-ai/Yi-6B-Chat", "Q4_K_M").path.parent.name == "01-ai--Yi-6B-Chat"
    assert "other letter case" in caplog.text
