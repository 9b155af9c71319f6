"""The conversation: user messages as plain text, replies as Markdown that streams in."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widget import AwaitMount
from textual.widgets import Markdown, Static


class UserMessage(Static):
    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="message user")
        self.text = text


class NoticeMessage(Static):
    """App notes in the conversation (errors, hints); not sent to the model."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(text, markup=False, classes=f"message notice {kind}")
        self.text = text


class ReplyMessage(Markdown):
    """A reply. One being written grows through `write`, which re-parses only its last Markdown block
    (Textual's incremental `Markdown.append`), so a token costs as much at the end of a long reply as at
    its start. Writes are awaited one at a time: the text that comes meanwhile waits in the caller's
    handoff and goes in with the next one (what Textual's MarkdownStream does, but its `stop()` returns
    while a render may still be running, and the app must know when the whole reply is on screen)."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text, classes="message assistant")
        self.text = text

    async def write(self, text: str, note: str | None = None) -> None:
        """Add `text` to the end of the reply and render it (the widget must be mounted); a reply's last write
        also ends it with an italic `note` (not part of its text) in the same render. The conversation
        scrolls to it in the next frame, once the new blocks are laid out."""
        self.text += text
        shown = text + (f"\n\n*{note}*" if note else "")
        if shown:
            await self.append(shown)
            if self.parent is not None:
                self.parent.scroll_end(animate=False)


class ChatLog(VerticalScroll):
    def add(self, widget) -> AwaitMount:
        mounted = self.mount(widget)
        self.scroll_end(animate=False)
        return mounted

    def clear_messages(self) -> None:
        self.remove_children()
