"""Two real `yi-local pull` processes of one model against the local hub: the second waits for the first
and reuses its download, the download goes when the last pull that needs it is done, and a pull killed
with SIGKILL leaves neither a lock nor a GGUF that `list` does not show."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO
from tests.hub_server import Hub, HubServer
from yi_local import hub as hub_module
from yi_local import store

REPO_ID = "01-ai/Yi-Tiny-Chat"
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def hub(chat_dir):
    h = Hub()
    h.add_folder(REPO_ID, chat_dir)
    with HubServer(h) as server:
        yield server


class Pull:
    """A `yi-local pull` in the background, its stderr collected line by line as it comes."""

    def __init__(self, server, *args: str):
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "yi_local", "pull", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self._reader.start()

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}: {''.join(self.lines)}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def holds_the_lock(self) -> bool:
        path = store.repo_lock(REPO_ID, "test").path
        return path.is_file() and path.read_text(errors="replace").startswith(f"{self.proc.pid} ")

    def finish(self) -> tuple[int, str, str]:
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout=120)
        self._reader.join()
        return code, out, "".join(self.lines)


def gets(server, name: str) -> int:
    return sum(1 for method, path, _ in server.hub.log if method == "GET" and path.endswith("/" + name))


def ggufs_on_disk() -> set:
    return {p for p in store.models_dir().rglob("*.gguf")}


def test_two_pulls_of_one_model_wait_and_share_the_download(hub):
    first = Pull(hub, f"{REPO_ID}:q4_0")
    first.wait_for(first.holds_the_lock, "the first pull to hold the lock")
    os.kill(first.proc.pid, signal.SIGSTOP)  # hold it there, so the second surely finds it busy
    try:
        second = Pull(hub, f"{REPO_ID}:q8_0")
        second.wait_for(lambda: any("waiting for another yi-local command" in line for line in second.lines),
                        "the second pull to wait")  # fmt: skip
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    code1, out1, err1 = first.finish()
    code2, out2, err2 = second.finish()
    assert (code1, code2) == (0, 0), err1 + err2
    assert f"pid {first.proc.pid}: yi-local pull {REPO_ID}:q4_0" in err2
    assert f"pulled {REPO_ID}:q4_0" in out1 and f"pulled {REPO_ID}:q8_0" in out2
    assert gets(hub, SHARD) == 1  # the second converted the first one's download
    assert "removed the downloaded weights" in out2 and "removed" not in out1  # by the last one to need it
    assert not hub_module.download_path(REPO_ID).exists()
    stored = store.list_models()
    assert sorted(m.quant for m in stored) == ["Q4_0", "Q8_0"]
    assert ggufs_on_disk() == {m.path for m in stored}
    assert "Traceback" not in err1 + err2


def test_a_download_kept_by_one_pull_is_kept(hub):
    first = Pull(hub, f"{REPO_ID}:q4_0", "--keep-source")
    first.wait_for(first.holds_the_lock, "the first pull to hold the lock")
    os.kill(first.proc.pid, signal.SIGSTOP)
    try:
        second = Pull(hub, f"{REPO_ID}:q8_0")
        second.wait_for(lambda: any("waiting for" in line for line in second.lines), "the second pull to wait")
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    (code1, out1, _), (code2, out2, _) = first.finish(), second.finish()
    assert (code1, code2) == (0, 0)
    kept = hub_module.download_path(REPO_ID)
    assert f"kept the downloaded weights in {kept}" in out1 and "removed" not in out2
    assert (kept / SHARD).is_file() and gets(hub, SHARD) == 1


def test_a_killed_pull_leaves_no_lock_and_no_stray_gguf(hub):
    first = Pull(hub, f"{REPO_ID}:q4_0")
    first.wait_for(first.holds_the_lock, "the first pull to hold the lock")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.finish()
    # What a pull killed between renaming its GGUF into place and recording it would leave.
    stray = store.model_folder(REPO_ID) / "Yi-Tiny-Chat-Q5_0.gguf"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"GGUF unrecorded")
    start = time.monotonic()
    code, out, err = Pull(hub, f"{REPO_ID}:q4_0").finish()
    assert code == 0, err
    assert "waiting for" not in err and time.monotonic() - start < 60
    assert ggufs_on_disk() == {m.path for m in store.list_models()} and not stray.exists()


def test_a_pull_into_a_folder_with_a_damaged_manifest_changes_nothing(hub):
    """Replacing a manifest that cannot be read would orphan the models it lists: the pull stops first."""
    folder = store.model_folder(REPO_ID)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"repo": "01-ai/Yi-Tiny-Chat", "files": {"Q8_0": ')
    (folder / "Yi-Tiny-Chat-Q8_0.gguf").write_bytes(b"GGUF the user's model")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    code, out, err = Pull(hub, f"{REPO_ID}:q4_0").finish()
    assert code == 1 and "Traceback" not in err
    assert f"the store's manifest {folder / 'manifest.json'} is damaged" in err and "delete it" in err
    assert {p: p.read_bytes() for p in folder.iterdir()} == before and gets(hub, SHARD) == 0
