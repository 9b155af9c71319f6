"""The chat app driven by Textual's Pilot: on the real llama.cpp backend, and on a scripted one where
timing must be exact (stopping mid-reply)."""

from __future__ import annotations

import asyncio

import pytest

from tests.scripted_backend import ScriptedBackend
from tui.app import ChatApp
from tui.session import Session, Settings, list_sessions, load_session
from tui.widgets.messages import NoticeMessage, ReplyMessage, UserMessage
from tui.widgets.prompt import PromptInput
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend

SIZE = (80, 24)


async def wait_until(pilot, predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.backend is not None or pilot.app.load_error is not None)


async def type_and_send(pilot, text: str) -> None:
    prompt = pilot.app.query_one(PromptInput)
    prompt.focus()
    prompt.insert(text)
    await pilot.press("enter")


def scripted_app(*replies: str, paced: bool = False, session: Session | None = None, **kw):
    backend = ScriptedBackend(list(replies), paced=paced)
    return ChatApp(lambda progress: (progress(1.0), backend)[1], session=session, **kw), backend


def messages(app, kind):
    return [w.text for w in app.query(kind)]


# -- the real llama.cpp backend ---------------------------------------------------------------
async def test_send_a_message_and_see_the_streamed_reply(chat_gguf):
    app = ChatApp(lambda progress: load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2, on_progress=progress)),
                  session=Session(settings=Settings(temperature=0, max_tokens=12)))  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.status.model == "Yi-Tiny-chat Q8_0" and app.status.offload == "llama.cpp CPU"
        await type_and_send(pilot, "Hello Yi, 你好")
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        reply = app.session.messages[1]["content"]
        # The same reply the runtime gives on its own.
        reference = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2))
        events = reference.generate(reference.chat_tokens([{"role": "user", "content": "Hello Yi, 你好"}]),
                                    SamplingParams(max_tokens=12, temperature=0))  # fmt: skip
        assert reply == "".join(e.text for e in events if isinstance(e, TextDelta)) and reply
        assert messages(app, UserMessage) == ["Hello Yi, 你好"]
        assert messages(app, ReplyMessage) == [reply]
        assert app.status.context.startswith("ctx ") and app.status.context.endswith("/512")
        assert app.status.speed.endswith("tok/s")


async def test_a_missing_model_shows_an_error_and_the_app_keeps_running(tmp_path):
    missing = tmp_path / "nope.gguf"
    app = ChatApp(lambda progress: load_backend(str(missing), LoadOptions()))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.load_error is not None and "no such model file" in app.load_error.message
        notices = messages(app, NoticeMessage)
        assert any("Could not load the model" in n and "nope.gguf" in n for n in notices)
        await type_and_send(pilot, "hello?")
        assert app.session.messages == []  # nothing sent, nothing lost
        await type_and_send(pilot, "/sessions")
        await pilot.pause()
        assert any("No saved sessions" in n for n in messages(app, NoticeMessage))
        await type_and_send(pilot, "/quit")
        await pilot.pause()
    assert app.return_code == 0


# -- scripted backend: exact timing -------------------------------------------------------------
async def test_escape_stops_mid_reply_and_keeps_the_text():
    app, backend = scripted_app("one two three four five six", paced=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "count")
        backend.step(2)
        await wait_until(pilot, lambda: app.query(ReplyMessage) and app.query_one(ReplyMessage).text == "one two ")
        assert app.generating
        await pilot.press("escape")
        backend.step()  # the runtime looks at the cancel flag before the next token
        await wait_until(pilot, lambda: not app.generating)
        assert app.session.messages[-1] == {"role": "assistant", "content": "one two "}
        assert app.query_one(ReplyMessage).text == "one two "


async def test_multi_line_input_and_history_recall():
    app, backend = scripted_app("a", "b")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        await pilot.press("l", "i", "n", "e", "1", "ctrl+j", "l", "i", "n", "e", "2")
        assert prompt.text == "line1\nline2"
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        assert app.session.messages[0] == {"role": "user", "content": "line1\nline2"}
        assert prompt.text == ""
        await pilot.press("up")
        assert prompt.text == "line1\nline2"
        await pilot.press("down")
        assert prompt.text == ""


async def test_settings_commands_reach_the_sampler():
    app, backend = scripted_app("x")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for command in ("/temperature 0.3", "/top_p 0.5", "/max_tokens 77", "/system Be terse."):
            await type_and_send(pilot, command)
        await type_and_send(pilot, "hi")
        await wait_until(pilot, lambda: len(backend.params) == 1 and not app.generating)
        params = backend.params[0]
        assert (params.temperature, params.top_p, params.max_tokens) == (0.3, 0.5, 77)
        rendered = "".join(map(chr, backend.prompts[0]))
        assert rendered.startswith("<|im_start|>system\nBe terse.<|im_end|>")
        await type_and_send(pilot, "/temperature hot")
        await type_and_send(pilot, "/top_p 7")
        await pilot.pause()
        assert app.session.settings.temperature == 0.3 and app.session.settings.top_p == 0.5
        await type_and_send(pilot, "/system none")
        assert app.session.system is None


async def test_clear_drop_and_retry():
    app, backend = scripted_app("first reply", "second reply", "second again")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "q1")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        await type_and_send(pilot, "q2")
        await wait_until(pilot, lambda: len(app.session.messages) == 4 and not app.generating)
        await type_and_send(pilot, "/retry")
        await wait_until(pilot, lambda: len(backend.prompts) == 3 and not app.generating)
        assert [m["content"] for m in app.session.messages] == ["q1", "first reply", "q2", "second again"]
        assert backend.prompts[2] == backend.prompts[1]  # the same conversation, asked again
        await type_and_send(pilot, "/drop")
        await pilot.pause()
        assert [m["content"] for m in app.session.messages] == ["q2", "second again"]
        assert messages(app, UserMessage) == ["q2"]
        await type_and_send(pilot, "/clear")
        await pilot.pause()
        assert app.session.messages == [] and not app.query(UserMessage) and backend.resets == 1


async def test_a_reply_cut_at_the_token_limit_ends_in_view_after_a_retry_too():
    """The note that ends a reply ("cut at the token limit") is on screen when the reply ends, whatever the
    conversation above it, including after /retry redraws it all."""
    long = " ".join(f"word{i}" for i in range(300))
    app, backend = scripted_app(long, long, long, session=Session(settings=Settings(max_tokens=120)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for n, text in ((2, "q1"), (4, "q2")):
            await type_and_send(pilot, text)
            await wait_until(pilot, lambda n=n: len(app.session.messages) == n and not app.generating)
        await type_and_send(pilot, "/retry")
        await wait_until(pilot, lambda: len(backend.prompts) == 3 and not app.generating)
        await pilot.pause(0.1)
        log = app.log_view
        assert log.max_scroll_y > 0 and log.scroll_offset.y == log.max_scroll_y  # the note is the last line


async def test_save_then_load_restores_the_conversation_exactly():
    app, backend = scripted_app("Here is code:\n\n```python\nprint('hi')\n```", "unused")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "/system You are Yi.")
        await type_and_send(pilot, "/temperature 0.2")
        await type_and_send(pilot, "show me code\nplease")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        saved = app.session.to_json()
        await type_and_send(pilot, "/save trip-1")
        await pilot.pause()
        assert "trip-1" in list_sessions()
        await type_and_send(pilot, "/clear")
        await type_and_send(pilot, "/system other")
        await type_and_send(pilot, "/temperature 1.5")
        await type_and_send(pilot, "/load trip-1")
        await pilot.pause()
        assert app.session.to_json() == saved
        assert messages(app, UserMessage) == ["show me code\nplease"]
        assert messages(app, ReplyMessage) == ["Here is code:\n\n```python\nprint('hi')\n```"]
        await type_and_send(pilot, "/sessions")
        await pilot.pause()
        assert any("trip-1" in n for n in messages(app, NoticeMessage))
        await type_and_send(pilot, "/load no-such-session")
        await type_and_send(pilot, "/save ../escape")
        await pilot.pause()
        assert list_sessions() == ["trip-1"]


async def test_session_name_autosaves_and_resumes():
    app, _ = scripted_app("hello back", session_name="daily")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "hello")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
        await pilot.pause(0.1)
    resumed = load_session("daily")
    assert resumed.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello back"}]
    app2, _ = scripted_app(session=resumed, session_name="daily")
    async with app2.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert messages(app2, UserMessage) == ["hello"] and messages(app2, ReplyMessage) == ["hello back"]


async def test_help_unknown_command_completion_and_quit():
    app, _ = scripted_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "/help")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "HelpScreen"
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen.__class__.__name__ != "HelpScreen"
        await type_and_send(pilot, "/frobnicate")
        await pilot.pause()
        assert any("Unknown command /frobnicate" in str(n.message) for n in app._notifications)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        await pilot.press("/", "t", "e", "tab")
        assert prompt.text == "/temperature "
        prompt.clear()
        await pilot.press("/", "s", "tab")  # /save, /sessions, /system: no unique completion
        assert prompt.text == "/s"
        hint = app.query_one("#hint")
        assert "/save" in str(hint.render()) and "/system" in str(hint.render())
        prompt.clear()
        await type_and_send(pilot, "/quit")
        await pilot.pause()
    assert app.return_code == 0


async def test_near_the_context_limit_the_user_is_told():
    backend = ScriptedBackend(["a long answer"], n_ctx=300)
    app = ChatApp(lambda progress: backend, session=Session(settings=Settings(max_tokens=200)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "x" * 80)
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        await pilot.pause()
        warnings = [n for n in app._notifications if n.title == "Context nearly full"]
        assert warnings and "/drop" in str(warnings[0].message)


@pytest.fixture
def scripted_conversation_app():
    app, _ = scripted_app("Here is a function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nCall `add(1, 2)`.")
    return app
