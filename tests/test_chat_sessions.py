"""Chat sessions off the happy path: a save that fails is shown and the conversation kept, a session file
with wrong types fails on load with the field named, /drop is bounded, bad session names are refused
before the model loads, and a session is open in one chat at a time."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, run_cli
from tests.test_tui import SIZE, messages, ready, scripted_app, type_and_send, wait_until
from tui.app import ChatApp
from tui.session import Session, load_session, lock_session, save_session, sessions_dir
from tui.widgets.messages import ReplyMessage, UserMessage
from yi_local.errors import YiLocalError
from yi_local.locks import Lock


def notes(app) -> list[str]:
    return [f"{n.title or ''}: {n.message}" for n in app._notifications]


# -- saving errors --------------------------------------------------------------------------------
async def test_an_autosave_that_cannot_write_is_shown_and_the_conversation_kept():
    sessions_dir().parent.mkdir(parents=True, exist_ok=True)
    sessions_dir().write_text("a file where the sessions folder should be")  # unwritable, for root too
    app, _ = scripted_app("hello back", session_name="daily")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "hello")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        await pilot.pause()
        assert any("Could not save the session daily" in n for n in notes(app))
        assert messages(app, UserMessage) == ["hello"] and messages(app, ReplyMessage) == ["hello back"]
        await type_and_send(pilot, "/save other")
        await pilot.pause()
        assert any("Could not save the session other" in n for n in notes(app)) and app.session_name == "daily"
        sessions_dir().unlink()  # room again: the kept conversation can be saved
        await type_and_send(pilot, "/save daily")
        await pilot.pause()
    assert load_session("daily").messages == app.session.messages and len(app.session.messages) == 2


async def test_a_full_disk_while_autosaving_is_shown_and_the_conversation_kept(monkeypatch):
    app, _ = scripted_app("hello back", session_name="daily")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
        await type_and_send(pilot, "hello")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        await pilot.pause()
        assert any("Could not save the session daily" in n and "No space left" in n for n in notes(app))
        assert messages(app, ReplyMessage) == ["hello back"] and app.is_running
    assert not sessions_dir().exists() or list(sessions_dir().iterdir()) == []  # not even a temporary file


# -- validation on load ---------------------------------------------------------------------------
def good() -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "system": "Be brief.", "settings": {"temperature": 0.5, "top_p": 0.9, "max_tokens": 64}}  # fmt: skip


def changed(**kw) -> dict:
    return {**good(), **kw}


BAD_SESSIONS = {
    "a JSON list": ([good()], "the file must be an object, not [{"),
    "messages a string": (changed(messages="hi"), "'messages' must be a list, not \"hi\""),
    "a message a string": (changed(messages=["hi"]), "messages[0] must be an object, not \"hi\""),
    "content a number": (changed(messages=[{"role": "user", "content": 5}]), "messages[0].content must be text, not 5"),
    "content missing": (changed(messages=[{"role": "user"}]), "messages[0].content must be text, not null"),
    "role system": (changed(messages=[{"role": "system", "content": "x"}]),
                    "messages[0].role must be 'user' or 'assistant', not \"system\""),
    # the runtime's ranges (yi_local.runtime.params), as every front end uses them
    "temperature a string": (changed(settings={"temperature": "hot"}),
                             "temperature must be a number at least 0 and at most 2 (0 is greedy), not \"hot\""),
    "temperature too high": (changed(settings={"temperature": 50}), "temperature must be a number at least 0 and at most 2"),
    "top_p zero": (changed(settings={"top_p": 0}), "top_p must be a number above 0 and at most 1 (1 is off), not 0"),
    "max_tokens a fraction": (changed(settings={"max_tokens": 1.5}), "max_tokens must be an integer at least 1"),
    "max_tokens a bool": (changed(settings={"max_tokens": True}), "max_tokens must be an integer at least 1"),
    "max_tokens huge": (changed(settings={"max_tokens": 10**30}), "at most 2147483647"),
    "settings a list": (changed(settings=[]), "'settings' must be an object, not []"),
    "system a number": (changed(system=7), "'system' must be text, not 7"),
    "unknown key": (changed(model="x"), "unknown key \"model\""),
    "unknown setting": (changed(settings={"top_k": 3}), "unknown key \"top_k\" in settings"),
    "unknown message key": (changed(messages=[{"role": "user", "content": "x", "t": 1}]),
                            "unknown key \"t\" in messages[0]"),
}


def write_session(name: str, data) -> None:
    sessions_dir().mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (sessions_dir() / f"{name}.json").write_text(text)


@pytest.mark.parametrize("case", list(BAD_SESSIONS))
def test_a_session_with_wrong_types_fails_on_load_naming_the_field(case):
    data, message = BAD_SESSIONS[case]
    write_session("bad", data)
    with pytest.raises(YiLocalError) as e:
        load_session("bad")
    assert "bad.json is damaged" in e.value.message and message in e.value.message


@pytest.mark.parametrize("text", ["nan", '{"settings": {"temperature": NaN}}', "[" * 100000 + "]" * 100000],
                         ids=["a number", "NaN temperature", "nested too deep"])  # fmt: skip
def test_a_session_that_is_not_a_session_fails_on_load(text):
    write_session("bad", text)
    with pytest.raises(YiLocalError, match="is damaged"):
        load_session("bad")


def test_a_good_session_round_trips():
    write_session("good", good())
    session = load_session("good")
    assert json.loads(session.to_json()) == good()


async def test_load_of_a_damaged_session_keeps_the_current_one():
    write_session("bad", changed(settings={"temperature": "hot"}))
    app, backend = scripted_app("first", "second")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "q1")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        await type_and_send(pilot, "/load bad")
        await pilot.pause()
        assert any("temperature must be a number" in n for n in notes(app))
        assert app.session_name is None and [m["content"] for m in app.session.messages] == ["q1", "first"]
        await type_and_send(pilot, "q2")  # the next message works
        await wait_until(pilot, lambda: len(app.session.messages) == 4 and not app.generating)
        assert backend.params[-1].temperature == 0.7


# -- /drop ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
async def test_drop_of_a_huge_number_returns_at_once():
    app, _ = scripted_app("a", "b")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for prompt in ("q1", "q2"):
            await type_and_send(pilot, prompt)
            await wait_until(pilot, lambda: not app.generating and app.session.messages[-1]["role"] == "assistant")
        start = time.monotonic()
        await type_and_send(pilot, "/drop 1000000000000")
        await pilot.pause()
        assert time.monotonic() - start < 5
        assert app.session.messages == [] and any("Forgot the 2 oldest turns" in n for n in notes(app))
        for bad in ("/drop 0", "/drop -3", "/drop many", "/drop " + "9" * 5000):
            await type_and_send(pilot, bad)
            await pilot.pause()
        assert sum("/drop needs a number of turns (1 or more)" in n for n in notes(app)) == 4


def test_drop_oldest_turns_is_bounded_by_the_turns():
    session = Session(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 3)
    assert session.drop_oldest_turns(10**12) == 3 and session.messages == []


# -- one chat per session -------------------------------------------------------------------------
HOLD = """
import sys, time
from tui.session import lock_session
lock = lock_session(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_elsewhere():
    """The session 'work' held by another process (as a chat would hold it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, "work"], cwd=REPO, env=os.environ, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline() == "held\n"
    yield proc
    proc.kill()
    proc.wait()


async def test_save_and_load_of_a_session_held_elsewhere_are_refused(held_elsewhere):
    save_session("work", Session(messages=[{"role": "user", "content": "theirs"}]))
    before = (sessions_dir() / "work.json").read_bytes()
    app, _ = scripted_app("mine")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "q")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        for command in ("/save work", "/load work"):
            await type_and_send(pilot, command)
            await pilot.pause()
        refusals = [n for n in notes(app) if "the session 'work' is open in another process" in n]
        assert len(refusals) == 2 and f"pid {held_elsewhere.pid}: yi-local chat" in refusals[0]
        assert app.session_name is None and app.session.messages[0]["content"] == "q"
    assert (sessions_dir() / "work.json").read_bytes() == before
    with pytest.raises(YiLocalError, match=f"pid {held_elsewhere.pid}"):
        ChatApp(lambda progress: None, session_name="work")


async def test_the_app_releases_its_session_when_it_ends():
    app, _ = scripted_app("x", session_name="mine")
    with pytest.raises(YiLocalError):
        lock_session("mine")  # held by the app, from its start
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "/save other")  # switching: the old name is let go, the new one held
        await pilot.pause()
        lock_session("mine").release()
        with pytest.raises(YiLocalError):
            lock_session("other")
    lock_session("other").release()


class Terminal:
    """A real `yi-local chat` in a pseudo-terminal; what it paints is read and thrown away."""

    def __init__(self, *args: str):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "yi_local", "chat", *args], cwd=REPO, env=os.environ,
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
        os.close(slave)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        try:
            while os.read(self.master, 65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_a_second_chat_on_a_session_is_refused_before_loading_the_model(chat_gguf):
    first = Terminal(str(chat_gguf), "--session", "work", "--ctx", "256", "--threads", "1")
    try:
        lock_file = Lock("session-work", "probe").path
        deadline = time.monotonic() + 60
        while not (lock_file.is_file() and lock_file.read_text().startswith(f"{first.proc.pid} ")):
            assert time.monotonic() < deadline and first.proc.poll() is None, "the first chat never took the session"
            time.sleep(0.05)
        second = run_cli("chat", str(chat_gguf), "--session", "work", timeout=60)
        assert second.returncode == 1 and "Traceback" not in second.stderr and second.stdout == ""
        assert "the session 'work' is open in another process" in second.stderr
        assert f"pid {first.proc.pid}: yi-local chat" in second.stderr
    finally:
        first.close()
    lock_session("work").release()  # the killed chat held it no longer


def test_session_names():
    for name in ("../../x", "..", "a/b", "", "-rf", "x" * 65, os.fsdecode(b"\xff"), "work\n", ".hidden", "a b"):
        with pytest.raises(YiLocalError, match="is not a session name"):
            lock_session(name)
    for name in ("work", "Trip-2.v1_x", "x" * 64):
        lock_session(name).release()


@pytest.mark.parametrize("name", ["../../x", os.fsdecode(b"\xff"), "work\n"], ids=["dotdot", "bytes", "newline"])
def test_a_bad_session_name_is_refused_before_the_model_loads(chat_gguf, name):
    proc = run_cli("chat", str(chat_gguf), f"--session={name}", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert "is not a session name" in proc.stderr and "letters, digits" in proc.stderr
    assert not sessions_dir().exists()


def test_a_damaged_session_is_refused_before_the_model_loads(chat_gguf):
    write_session("bad", changed(messages="hi"))
    proc = run_cli("chat", str(chat_gguf), "--session", "bad", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert "bad.json is damaged: 'messages' must be a list, not \"hi\"" in proc.stderr
