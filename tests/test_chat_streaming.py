"""How a reply travels from the model to the screen: the generator never waits for the UI, the Markdown
is rendered incrementally (no re-parse of the whole reply), and what ends on screen is the whole reply,
block for block what a one-shot render of the same text shows. Speed figures live in bench/chat_speed.py;
these tests only guard the behaviour, with generous bounds."""

from __future__ import annotations

import time

import markdown_it
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownBlock

from tests.scripted_backend import ScriptedBackend
from tests.test_tui import SIZE, ready, scripted_app, type_and_send, wait_until
from tui.app import ChatApp
from tui.session import Session, Settings
from tui.widgets.prompt import PromptInput
from tui.widgets.messages import ReplyMessage

PROSE = ("The model writes this sentence with **bold**, *italic* and `code` in it, long enough to wrap "
         "across the reply's width at eighty columns, as prose does. 模型也用中文写一句话。 ") * 6
SECTION = "## Part {n}\n\n" + PROSE + "\n\n" + PROSE + "\n\n```python\ndef part_{n}(x):\n    return x * {n}\n```\n\n"
LIST = "- item one, with a [link](https://example.com/)\n- item two\n   1. nested\n\n"


def long_reply(words: int) -> str:
    """Markdown of at least `words` words (the scripted backend's tokens): headings, lists, code, CJK."""
    text, n = LIST, 0
    while len(text.split(" ")) < words:
        n += 1
        text += SECTION.format(n=n)
    return text + "The end."


def blocks(markdown: Markdown) -> list[tuple[str, str]]:
    """What a Markdown widget shows: every block (nested ones too) with its text."""
    return [(type(b).__name__, b._content.plain) for b in markdown.query(MarkdownBlock)]


async def one_shot_blocks(app, text: str) -> list[tuple[str, str]]:
    reference = ReplyMessage(text)
    await app.log_view.mount(reference)
    shown = blocks(reference)
    await reference.remove()
    return shown


async def test_the_generator_never_waits_for_a_busy_screen():
    reply = long_reply(3000)
    app, backend = scripted_app(reply, session=Session(settings=Settings(max_tokens=4096)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "write a lot")
        await wait_until(pilot, lambda: backend.prompts)  # the worker is generating
        time.sleep(1.5)  # the UI loop is stuck (a slow frame, a busy terminal): the model must go on
        unblocked = time.monotonic()
        assert backend.finished_at is not None and backend.finished_at < unblocked, "generation waited for the UI"
        assert max(backend.yield_waits) < 0.5  # no token ever waited for the screen
        await wait_until(pilot, lambda: not app.generating)
        view = app.query_one(ReplyMessage)
        # The screen caught up with all of it before the reply counted as done.
        assert view.text == reply and view.source == reply
        assert app.session.messages[-1] == {"role": "assistant", "content": reply}
        assert app.status.speed.endswith("tok/s")
        assert blocks(view) == await one_shot_blocks(app, reply)


async def test_a_long_reply_is_rendered_incrementally(monkeypatch):
    """Each render parses the reply's last block and the new text, never the whole reply again."""
    parsed: list[int] = []
    parse = markdown_it.MarkdownIt.parse
    monkeypatch.setattr(markdown_it.MarkdownIt, "parse", lambda self, src, env=None: parsed.append(len(src)) or parse(self, src, env))
    reply = long_reply(1200)
    app, backend = scripted_app(reply, session=Session(settings=Settings(max_tokens=4096)))
    backend.delay = 0.002  # the tokens come over a few seconds: several renders
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "write a lot")
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2, timeout=60)
        view = app.query_one(ReplyMessage)
        assert view.text == reply
        renders, longest_block = len(parsed), max(len(b) for b in reply.split("\n\n"))
        assert renders >= 4, "the reply should have been shown while it was written"
        # Re-parsing the whole reply at each render would parse about renders × len(reply) / 2 characters.
        assert sum(parsed) <= renders * longest_block + len(reply), \
            f"{renders} renders parsed {sum(parsed):,} characters of a {len(reply):,}-character reply"  # fmt: skip
        assert blocks(view) == await one_shot_blocks(app, reply)


async def test_the_note_after_a_reply_cut_at_the_token_limit_is_not_part_of_it():
    app, _ = scripted_app("one two three four five", session=Session(settings=Settings(max_tokens=3)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "count")
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        view = app.query_one(ReplyMessage)
        assert app.session.messages[-1]["content"] == view.text == "one two three "
        assert blocks(view)[-1] == ("MarkdownParagraph", "cut at the token limit")


async def test_the_end_of_a_reply_is_one_render_with_its_note_and_the_status_line(monkeypatch):
    """The last text and the note reach the screen in one render, and the status line says the reply is done
    only after it (a frame never shows the speed beside a reply still missing its end)."""
    renders: list[tuple[str, str]] = []
    append = ReplyMessage.append
    monkeypatch.setattr(ReplyMessage, "append", lambda self, text: renders.append((text, app.status.speed)) or append(self, text))
    app, _ = scripted_app("one two three four five", session=Session(settings=Settings(max_tokens=3)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "count")
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        text, speed = renders[-1]
        assert text.endswith("three \n\n*cut at the token limit*"), renders
        assert not speed.endswith("tok/s"), "the status line said the reply was done before its end was rendered"
        assert app.status.speed.endswith("tok/s")
        assert "".join(t for t, _ in renders) == "one two three \n\n*cut at the token limit*"


async def test_the_model_starts_before_the_replys_place_is_painted(monkeypatch):
    """The message's and the reply's first paint runs beside the prompt's evaluation, not before it."""
    order: list[str] = []
    generate, next_paint = ChatApp._generate, ChatApp._next_paint

    def started(self, *args):
        order.append("model")
        return generate(self, *args)

    async def painted(self):
        order.append("paint")
        await next_paint(self)

    monkeypatch.setattr(ChatApp, "_generate", started)
    monkeypatch.setattr(ChatApp, "_next_paint", painted)
    app, _ = scripted_app("one two three")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "count")
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        assert order[:2] == ["model", "paint"], order


async def test_a_context_overflow_reaches_the_screen_through_the_same_path():
    backend = ScriptedBackend(["never written"], n_ctx=64)
    app = ChatApp(lambda progress: backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "a question far too long for this context " * 10)
        await wait_until(pilot, lambda: not app.generating)
        assert [n.title for n in app._notifications] == ["Context full"]
        assert not app.query(ReplyMessage) and app.status.state == "" and backend.prompts == []
        await type_and_send(pilot, "/clear")
        await pilot.pause()
        assert app.session.messages == []


async def test_the_prompt_cursor_stops_blinking_while_the_model_writes():
    """A blink repaints the prompt twice a second, time a model on a busy CPU waits for."""
    app, backend = scripted_app("one two three", paced=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        assert prompt.cursor_blink
        await type_and_send(pilot, "count")
        await wait_until(pilot, lambda: backend.prompts)
        assert app.generating and not prompt.cursor_blink
        backend.step(3)
        await wait_until(pilot, lambda: not app.generating)
        assert prompt.cursor_blink
