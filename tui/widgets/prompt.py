"""The multi-line prompt: Enter sends, Ctrl+J (or Shift+Enter) makes a new line, Up/Down recall, Tab completes."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from tui.commands import complete

NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class PromptInput(TextArea):
    BINDINGS = [
        Binding("enter", "submit", "Send", show=True),
        Binding("ctrl+j", "newline", "New line", show=True, key_display="^J"),
    ]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.prompts: list[str] = []
        self._recall: int | None = None  # index into history while recalling
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
        elif event.key == "tab" and self.text.startswith("/"):
            event.stop()
            event.prevent_default()
            done = complete(self.text)
            if done:
                self.load_text(done)
                self.move_cursor(self.document.end)
        elif event.key == "up" and self.cursor_location[0] == 0 and self.prompts:
            event.stop()
            event.prevent_default()
            self._step_history(-1)
        elif event.key == "down" and self.cursor_location[0] == self.document.line_count - 1 and self._recall is not None:
            event.stop()
            event.prevent_default()
            self._step_history(+1)
        else:
            await super()._on_key(event)

    def action_submit(self) -> None:
        text = self.text
        if not text.strip():
            return
        if not self.prompts or self.prompts[-1] != text:
            self.prompts.append(text)
        self._recall = None
        self.clear()
        self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")

    def _step_history(self, step: int) -> None:
        if self._recall is None:
            self._draft = self.text
            index = len(self.prompts) + step
        else:
            index = self._recall + step
        if index < 0:
            return
        if index >= len(self.prompts):
            self._recall = None
            self.load_text(self._draft)
        else:
            self._recall = index
            self.load_text(self.prompts[index])
        self.move_cursor(self.document.end)
