"""`yi-local chat` in a real terminal (tmux), as a user would drive it: type, Enter, read the screen, quit.

With CI=true a missing tmux fails the test (`.ci/run` installs it); elsewhere it is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO
from tui.session import load_session
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def tmux_available():
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is needed (apt-get install tmux)")
        pytest.skip("tmux is not installed")


def test_one_real_exchange_in_tmux(tmux_available, chat_gguf):
    name = f"yi-{uuid.uuid4().hex[:8]}"
    env = f"YI_LOCAL_HOME={os.environ['YI_LOCAL_HOME']} HF_HUB_OFFLINE=1"  # the test's isolated home
    cmd = (f"cd {REPO} && {env} {sys.executable} -m yi_local chat {chat_gguf} --temperature 0 --max-tokens 8 "
           f"--ctx 512 --threads 2 --session tmux-test; echo EXITED $?; sleep 30")  # fmt: skip
    tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24", cmd)
    try:
        screen = wait_for_screen(name, lambda s: "ctx 0/512" in s)
        assert "Yi-Tiny-chat Q8_0 · llama.cpp CPU" in screen and "Send" in screen
        tmux("send-keys", "-t", name, "Hello from tmux", "Enter")
        screen = wait_for_screen(name, lambda s: "tok/s" in s)
        assert "Hello from tmux" in screen
        tmux("send-keys", "-t", name, "/quit", "Enter")
        wait_for_screen(name, lambda s: "EXITED 0" in s)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    # The reply that appeared is the runtime's own greedy reply (saved by --session).
    saved = load_session("tmux-test")
    backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2))
    events = backend.generate(backend.chat_tokens([{"role": "user", "content": "Hello from tmux"}]),
                              SamplingParams(max_tokens=8, temperature=0))  # fmt: skip
    expected = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert saved.messages == [{"role": "user", "content": "Hello from tmux"}, {"role": "assistant", "content": expected}]


def wait_for_screen(name: str, predicate, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-t", name, "-p")
        if predicate(screen):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"the screen never showed what was expected:\n{screen}")

