"""SVG snapshots of the chat at 80×24 (pytest-textual-snapshot). `make test-snapshot-update` refreshes them
after an intended change; review the SVGs in tests/__snapshots__ before committing."""

from __future__ import annotations

from tests.test_tui import ready, scripted_app, type_and_send, wait_until
from tui.widgets.prompt import PromptInput

CODE_REPLY = "Here is a function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nCall `add(1, 2)` to get 3."


async def settle(pilot) -> None:
    await ready(pilot)
    pilot.app.query_one(PromptInput).cursor_blink = False
    await pilot.pause()


def test_snapshot_empty_chat(snap_compare):
    app, _ = scripted_app()
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


def test_snapshot_conversation_with_code_block(snap_compare):
    app, _ = scripted_app(CODE_REPLY)

    async def run_before(pilot):
        await settle(pilot)
        await type_and_send(pilot, "Write an add function in Python")
        await wait_until(pilot, lambda: len(pilot.app.session.messages) == 2 and not pilot.app.generating)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_snapshot_help_screen(snap_compare):
    app, _ = scripted_app()
    assert snap_compare(app, terminal_size=(80, 24), press=["f1"], run_before=settle)


def test_snapshot_error_notification(snap_compare):
    app, _ = scripted_app()

    async def run_before(pilot):
        await settle(pilot)
        await type_and_send(pilot, "/frobnicate")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
