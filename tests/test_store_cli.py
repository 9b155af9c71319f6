"""The store commands off the happy path, through the real CLI: bad names and store folders give one line
and a hint (exit 1, no traceback, nothing new in the store), `show` never writes, and a confirmation
prompt answered with Ctrl+D, Ctrl+C or bytes that are not text is a "no"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.test_store_safety import REPO_ID, add_model
from yi_local import store
from yi_local.paths import home


def store_files() -> set[Path]:
    """What the store and the downloads hold (lock files aside: they are not models)."""
    return {p for d in ("models", "downloads") for p in (home() / d).rglob("*")} if home().is_dir() else set()


LONG = "a" * 5000
BAD_NAMES = [
    # (arguments, what the message must name)
    (["pull", "yi:"], "'yi:' is not a known model name"),
    (["pull", "::"], "'::' is not a known model name"),
    (["pull", "a/b/c/d"], "a/b/c/d is a path: pull takes a model name"),
    (["run", "a/b/c/d", "hi"], "a/b/c/d: no such file or folder"),
    (["pull", "yi:6b:q9"], "'q9' is not a quantization the store keeps"),
    (["rm", "yi:6b-chat:q9", "--yes"], "'q9' is not a quantization the store keeps"),
    (["show", "yi:6b-chat:f16"], "'f16' is not a quantization the store keeps"),
    (["pull", f"x/{LONG}"], "is not a known model name"),
    (["run", LONG, "hi"], "is not a known model name"),
    (["show", "~no-such-user-here/m.gguf"], "m.gguf"),
    (["pull", os.fsdecode(b"\xff\xfe")], "is not a known model name"),
    (["rm", "yi:6b-chat", "--yes"], "yi:6b-chat is not in the store"),
    (["pull", "01-ai/Yi-6B-Chat\n"], "is not a known model name"),
    (["pull", "."], ". is a path: pull takes a model name or a hub repo id"),
    (["rm", "./Yi-6B-Chat-Q4_K_M.gguf", "--yes"], "is a path: rm removes models from the store, by name"),
    (["show", "/dev/null"], "/dev/null is neither a file nor a folder"),
]


@pytest.mark.parametrize(("args", "message"), BAD_NAMES, ids=[" ".join(a)[:30] for a, _ in BAD_NAMES])
def test_bad_names(args, message):
    before = store_files()
    proc = run_cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 2 and len(proc.stderr) < 600  # one line and a hint, names cut short
    assert store_files() == before


def make_home_a_file(tmp_path) -> dict:
    (tmp_path / "home-file").write_text("not a folder")
    return {"YI_LOCAL_HOME": str(tmp_path / "home-file")}


def make_store_a_file(tmp_path) -> dict:
    home().mkdir(parents=True, exist_ok=True)
    (home() / "models").write_text("not a folder")
    return {}


def make_store_unreadable(tmp_path) -> dict:
    home().mkdir(parents=True, exist_ok=True)
    (home() / "models").symlink_to(home() / "models")  # a loop: reading it fails, for root too
    return {}


BAD_HOMES = {
    "home is a file": (make_home_a_file, "is a file, not a folder"),
    "store is a file": (make_store_a_file, "is a file, not a folder"),
    "store unreadable": (make_store_unreadable, "cannot read the model store"),
}


@pytest.mark.parametrize("case", list(BAD_HOMES))
@pytest.mark.parametrize("args", [["list"], ["run", "yi:6b-chat", "hi"]], ids=["list", "run"])
def test_bad_store_folders(tmp_path, case, args):
    prepare, message = BAD_HOMES[case]
    env = prepare(tmp_path)
    proc = run_cli(*args, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr and "YI_LOCAL_HOME" in proc.stderr, proc.stderr


# -- show never writes ----------------------------------------------------------------------------
def test_show_of_a_folder_does_not_convert_it(chat_dir, tmp_path):
    proc = run_cli("show", str(chat_dir), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has not been converted yet" in proc.stderr and f"yi-local convert {chat_dir}" in proc.stderr
    assert store.list_models() == [] and store_files() == set() and list(tmp_path.iterdir()) == []


def test_show_of_a_missing_model_says_how_to_get_it():
    proc = run_cli("show", "yi:6b-chat")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "yi:6b-chat:q4_k_m is not in the store" in proc.stderr
    assert "`yi-local pull yi:6b-chat:q4_k_m`" in proc.stderr and "--pull" not in proc.stderr  # show has no --pull
    assert store_files() == set()


# -- confirmation prompts --------------------------------------------------------------------------
def answer_prompt(args: list[str], answer: str | bytes) -> tuple[int, str, str]:
    """Run the CLI with a terminal as stdin, wait for its [y/N] question, then answer (a signal name sends it)."""
    master, slave = os.openpty()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # as in a UTF-8 locale (a C locale would escape)
    proc = subprocess.Popen([sys.executable, "-m", "yi_local", *args], cwd=REPO, stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    os.close(slave)
    try:
        asked = b""
        deadline = time.monotonic() + 30
        while b"[y/N]" not in asked:
            assert time.monotonic() < deadline and proc.poll() is None, asked
            asked += os.read(proc.stdout.fileno(), 4096)
        if answer == "SIGINT":
            proc.send_signal(signal.SIGINT)  # what Ctrl+C does to the foreground process
        else:
            os.write(master, answer if isinstance(answer, bytes) else answer.encode())
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
        proc.kill()
    return proc.returncode, (asked + out).decode(errors="replace"), err.decode(errors="replace")


NO_ANSWERS = {"ctrl+d": b"\x04", "ctrl+c": "SIGINT", "not utf-8": b"\xff\xfe\n"}


@pytest.mark.parametrize("answer", list(NO_ANSWERS))
def test_rm_prompt_answered_without_a_yes_keeps_the_model(chat_gguf, answer):
    model = add_model(chat_gguf)
    code, out, err = answer_prompt(["rm", REPO_ID], NO_ANSWERS[answer])
    assert code == 0 and "Traceback" not in err, err
    assert "remove 01-ai/Yi-Tiny-Chat:q8_0" in out and out.rstrip().endswith("kept")
    assert store.list_models() == [model] and model.path.is_file()


@pytest.mark.parametrize("answer", ["ctrl+d", "ctrl+c", "not utf-8"])
def test_download_prompt_answered_without_a_yes_downloads_nothing(answer):
    code, out, err = answer_prompt(["run", "yi:6b-chat", "hi"], NO_ANSWERS[answer])
    assert code == 1 and "Traceback" not in err, err
    assert "yi:6b-chat:q4_k_m is not in the store. Download it now?" in out
    assert "error: yi:6b-chat:q4_k_m is not in the store" in err
    assert store_files() == set()


def test_rm_prompt_answered_yes_removes(chat_gguf):
    model = add_model(chat_gguf)
    code, out, _ = answer_prompt(["rm", REPO_ID], "y\n")
    assert code == 0 and "removed 01-ai/Yi-Tiny-Chat:q8_0" in out and not model.path.exists()


def test_a_local_folder_with_a_long_name_converts_into_the_store(chat_dir, tmp_path):
    import shutil

    folder = tmp_path / ("Yi-" + "x" * 240)  # 243 bytes: a file system's limit is 255, temp names are longer
    shutil.copytree(chat_dir, folder)
    proc = run_cli("run", str(folder), "hi", "--max-tokens", "1", "--ctx", "256")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [model] = store.list_models()
    assert model.repo == f"local/{folder.name}" and len(model.path.parent.name) <= 200
