"""The saved KV cache through the front ends: `chat --session` saves it after each reply and resumes from it
(one-line notes when it cannot), /sessions shows its size, /delete removes it; `run --prompt-cache FILE`
reuses a prompt's cache across runs."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli
from tests.test_tui import SIZE, messages, ready, type_and_send, wait_until
from tui.app import ChatApp
from tui.session import Session, Settings, load_session, save_session, sessions_dir, state_path
from tui.widgets.messages import NoticeMessage, ReplyMessage
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend
from yi_local.runtime.kv_state import meta_path

CHAT = Settings(temperature=0, max_tokens=10)


def chat_app(model, session: Session, name: str = "work", n_ctx: int = 512, **kw) -> ChatApp:
    def loader(progress):
        return load_backend(str(model), LoadOptions(n_ctx=n_ctx, n_threads=2, on_progress=progress))

    return ChatApp(loader, session=session, session_name=name, **kw)


def notices(app) -> list[str]:
    return messages(app, NoticeMessage)


def notifications(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def talk(pilot, app, text: str) -> None:
    n = len(app.session.messages)
    await type_and_send(pilot, text)
    await wait_until(pilot, lambda: len(app.session.messages) == n + 2 and not app.generating)


async def state_saved(pilot, name: str = "work") -> None:
    await wait_until(pilot, lambda: pilot.app._state_thread is not None and not pilot.app._state_thread.is_alive())
    assert meta_path(state_path(name)).exists()


def fresh_reply(model, conversation: list[dict], n_ctx: int = 512) -> str:
    """The reply a new backend gives to the whole conversation, evaluated at once, greedily."""
    backend = load_backend(str(model), LoadOptions(n_ctx=n_ctx, n_threads=2))
    events = backend.generate(backend.chat_tokens(conversation), CHAT.sampling(SamplingParams()))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    backend.close()
    return text


def reference_replies(model, turns: list[str], n_ctx: int = 512) -> list[str]:
    """The replies one uninterrupted backend gives to `turns`, greedily."""
    backend = load_backend(str(model), LoadOptions(n_ctx=n_ctx, n_threads=2))
    conversation: list[dict] = []
    out = []
    for text in turns:
        conversation.append({"role": "user", "content": text})
        events = backend.generate(backend.chat_tokens(conversation), CHAT.sampling(SamplingParams()))
        out.append("".join(e.text for e in events if isinstance(e, TextDelta)))
        conversation.append({"role": "assistant", "content": out[-1]})
    backend.close()
    return out


async def test_a_session_resumes_from_its_saved_kv_cache_with_the_same_replies(chat_gguf):
    turns = ["Tell me about the sea " * 6, "And the mountains?"]
    expected = reference_replies(chat_gguf, turns)
    app = chat_app(chat_gguf, Session(settings=CHAT))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await talk(pilot, app, turns[0])
        await state_saved(pilot)
    assert state_path("work").stat().st_size > 0

    resumed = chat_app(chat_gguf, load_session("work"))
    async with resumed.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: any("Resumed work" in n for n in notices(resumed)))
        cached = resumed.backend.engine.caches()[0][0]
        assert len(cached) > 30  # turn one is in the model's KV cache without having been evaluated
        await talk(pilot, resumed, turns[1])
        await pilot.pause()
        assert messages(resumed, ReplyMessage) == expected
    assert [m["content"] for m in load_session("work").messages if m["role"] == "assistant"] == expected


@pytest.mark.parametrize("change, note", [
    ({"n_ctx": 1024}, "the context size differs (512 then, 1024 now)"),
    ("edit", "the conversation differs from the one the state was saved with"),
    ("damage", "damaged"),
])  # fmt: skip
async def test_a_state_that_does_not_fit_is_not_used_and_the_reply_is_still_right(chat_gguf, change, note):
    turns = ["Tell me about the sea " * 6, "And the mountains?"]
    app = chat_app(chat_gguf, Session(settings=CHAT))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await talk(pilot, app, turns[0])
        await state_saved(pilot)
    session = load_session("work")
    n_ctx = 512
    if change == "edit":  # the JSON edited by hand after the state was saved
        session.messages[0]["content"] = "Tell me about the lakes"
        save_session("work", session)
        turns[0] = "Tell me about the lakes"
    elif change == "damage":
        path = state_path("work")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    else:
        n_ctx = change["n_ctx"]
    resumed = chat_app(chat_gguf, session, n_ctx=n_ctx)
    async with resumed.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: any("was not used" in n for n in notices(resumed)))
        assert any(note in n and "evaluated again" in n for n in notices(resumed))
        assert resumed.backend.engine.caches()[0] == ([], [])
        await talk(pilot, resumed, turns[1])
        await pilot.pause()
    # the reply is the one a new model gives to the conversation (the edited one, where it was edited)
    conversation = resumed.session.chat_messages()
    assert conversation[-1]["role"] == "assistant"
    assert conversation[-1]["content"] == fresh_reply(chat_gguf, conversation[:-1], n_ctx)


async def test_sessions_shows_state_sizes_delete_removes_a_session_with_its_state_and_the_cap_holds(chat_gguf):
    app = chat_app(chat_gguf, Session(settings=CHAT))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await talk(pilot, app, "Hello there")
        await state_saved(pilot)
        size = state_path("work").stat().st_size
        await type_and_send(pilot, "/sessions")
        await pilot.pause()
        listed = notices(app)[-1]
        assert re.search(r"work \(KV cache [\d.]+ KiB\)", listed), listed
        await type_and_send(pilot, "/save other")  # a second name gets the conversation and its state
        await wait_until(pilot, lambda: meta_path(state_path("other")).exists())
        assert state_path("other").stat().st_size == size
        await type_and_send(pilot, "/delete work")
        await pilot.pause()
        assert any("Deleted the session work" in n for n in notifications(app))
        await type_and_send(pilot, "/delete nothing-here")
        await pilot.pause()
        assert any("there is no session 'nothing-here'" in n for n in notifications(app))
    assert sorted(p.name for p in sessions_dir().iterdir() if not p.name.startswith(".")) == [
        "other.json", "other.kv", "other.kv.meta"]  # fmt: skip

    capped = chat_app(chat_gguf, Session(settings=CHAT), name="small", max_state_bytes=1000)
    async with capped.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await talk(pilot, capped, "Hello there")
        await wait_until(pilot, lambda: any("was not saved" in n for n in notices(capped)))
        assert any("more than the 1000 B allowed" in n and "--max-state-size" in n for n in notices(capped))
    assert (sessions_dir() / "small.json").exists() and not state_path("small").exists()

    # a save still waiting when the session is deleted must not leave its state behind
    import tui.session_state as session_state_module

    real = session_state_module.save_state

    def slow_save(*a, **kw):
        import time

        time.sleep(1.0)  # a large state on a slow disk
        return real(*a, **kw)

    session_state_module.save_state = slow_save
    try:
        racing = chat_app(chat_gguf, Session(settings=CHAT), name="racing")
        async with racing.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await talk(pilot, racing, "Hello there")
            await type_and_send(pilot, "/delete racing")
            await pilot.pause(1.5)
    finally:
        session_state_module.save_state = real
    assert not any(p.name.startswith("racing") for p in sessions_dir().iterdir())

    off = chat_app(chat_gguf, Session(settings=CHAT), name="nostate", max_state_bytes=0)
    async with off.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await talk(pilot, off, "Hello there")
        await pilot.pause(0.3)
    assert (sessions_dir() / "nostate.json").exists() and not state_path("nostate").exists()
    assert not any("KV cache" in n for n in notices(off))


def _timing(stderr: str) -> int:
    """The evaluated prompt tokens `run --verbose-timings` reports."""
    return int(re.search(r"prompt (\d+) tok", stderr).group(1))


@pytest.mark.slow
def test_run_prompt_cache_reuses_the_prompt_across_runs(chat_gguf, tmp_path):
    cache = tmp_path / "doc.kv"
    system = "A document about the sea. " * 30
    common = [str(chat_gguf), "--system", system, "--temperature", "0", "--max-tokens", "8", "--verbose-timings",
              "--ctx", "1024"]  # fmt: skip
    plain = run_cli("run", *common, "What is it about?")
    first = run_cli("run", *common, "--prompt-cache", str(cache), "What is it about?")
    assert first.returncode == 0 and first.stdout == plain.stdout, first.stderr
    assert cache.stat().st_size > 0 and meta_path(cache).exists()
    full = _timing(first.stderr)
    assert full == _timing(plain.stderr)

    second = run_cli("run", *common, "--prompt-cache", str(cache), "Who wrote it?")
    plain_2 = run_cli("run", *common, "Who wrote it?")
    assert second.returncode == 0, second.stderr
    assert _timing(second.stderr) < full - 150  # the document came from the cache
    # ... and the reply is the one a model that had just read the first prompt gives to the second
    backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=1024))
    greedy = SamplingParams(temperature=0, max_tokens=8)
    for question in ("What is it about?", "Who wrote it?"):
        conversation = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = "".join(e.text for e in backend.generate(backend.chat_tokens(conversation), greedy)
                       if isinstance(e, TextDelta))  # fmt: skip
    backend.close()
    assert second.stdout == text + "\n"

    other = run_cli("run", *common, "--kv-type", "q8_0", "--prompt-cache", str(cache), "Who wrote it?")
    assert other.returncode == 0, other.stderr
    assert "the prompt cache" in other.stderr and "the KV cache type differs (f16 then, q8_0 now)" in other.stderr
    assert _timing(other.stderr) == _timing(plain_2.stderr)  # evaluated in full, and the cache written again
    again = run_cli("run", *common, "--kv-type", "q8_0", "--prompt-cache", str(cache), "Who wrote it?")
    assert "not used" not in again.stderr and _timing(again.stderr) < 5


def test_run_prompt_cache_never_overwrites_what_is_not_a_prompt_cache(chat_gguf, tmp_path):
    import json
    import os

    logo, logo_meta = tmp_path / "logo.png", tmp_path / "logo.png.meta"  # a Unity asset and its .meta
    logo.write_bytes(b"PNGDATA")
    logo_meta.write_text("guid: 1234\n")
    notes_meta = tmp_path / "notes.meta"
    notes_meta.write_text("my notes")
    model = tmp_path / "model.gguf"
    model.write_bytes(chat_gguf.read_bytes())
    (tmp_path / "model.gguf.meta").write_text(json.dumps({"binding": {}, "n_tokens": 1}))  # looks like ours
    fifo = tmp_path / "pipe.kv"
    os.mkfifo(fifo)
    for target, said in ((logo, "logo.png.meta exists and is not a prompt cache's"),
                         (tmp_path / "notes", "notes.meta exists and is not a prompt cache's"),
                         (model, "is the model file"), (fifo, "is not a regular file")):  # fmt: skip
        result = run_cli("run", str(model), "--prompt-cache", str(target), "hi", "--max-tokens", "2", timeout=60)
        assert result.returncode == 1 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "yi-local: Yi-Tiny-chat" not in result.stderr  # refused before the model loaded
    assert logo.read_bytes() == b"PNGDATA" and logo_meta.read_text() == "guid: 1234\n"
    assert notes_meta.read_text() == "my notes" and model.read_bytes() == chat_gguf.read_bytes()


def test_run_prompt_cache_refuses_what_it_cannot_use(chat_gguf, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes")
    refused = run_cli("run", str(chat_gguf), "--prompt-cache", str(precious), "hi")
    assert refused.returncode == 1 and "is not a prompt cache" in refused.stderr and "Traceback" not in refused.stderr
    assert precious.read_text() == "my notes"
    folder = run_cli("run", str(chat_gguf), "--prompt-cache", str(tmp_path), "hi")
    assert folder.returncode == 1 and "is a folder" in folder.stderr
    missing = run_cli("run", str(chat_gguf), "--prompt-cache", str(tmp_path / "no" / "such" / "x.kv"), "hi")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    size = run_cli("chat", str(chat_gguf), "--max-state-size", "12Q")
    assert size.returncode == 1 and "'12Q' is not a size" in size.stderr
