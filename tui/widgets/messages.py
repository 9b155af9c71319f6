"""The conversation: user messages as plain text, replies as Markdown that streams in."""

from __future__ import annotations

from textual.containers import VerticalScroll
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
    """A reply; `append` may be called many times a second, the widget re-renders at most 20 times."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text, classes="message assistant")
        self.text = text
        self._dirty = False

    def on_mount(self) -> None:
        self._timer = self.set_interval(1 / 20, self._refresh_text, pause=True)

    def append(self, delta: str) -> None:
        self.text += delta
        self._dirty = True
        self._timer.resume()

    def finish(self, note: str | None = None) -> None:
        """Render the whole reply, with an italic note (not part of the reply's text) if given."""
        self._timer.pause()
        self._dirty = False
        self.update(self.text + (f"\n\n*{note}*" if note else ""))

    def _refresh_text(self) -> None:
        if self._dirty:
            self._dirty = False
            self.update(self.text)
            if self.parent is not None:
                self.parent.scroll_end(animate=False)


class ChatLog(VerticalScroll):
    def add(self, widget) -> None:
        self.mount(widget)
        self.scroll_end(animate=False)

    def clear_messages(self) -> None:
        self.remove_children()
