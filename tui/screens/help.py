"""The help screen: keys and slash commands."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from tui.commands import COMMANDS

KEYS = [
    ("Enter", "send the message"),
    ("Ctrl+J", "new line (or Shift+Enter, where the terminal sends it)"),
    ("Esc", "stop the reply, keeping what was written"),
    ("Up / Down", "recall earlier prompts"),
    ("Tab", "complete a /command"),
    ("Ctrl+Q", "quit"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        text = Text()
        text.append("Keys\n", style="bold")
        for key, what in KEYS:
            text.append(f"  {key:<12}", style="bold").append(f"{what}\n")
        text.append("\nCommands\n", style="bold")
        for c in COMMANDS.values():
            text.append(f"  {c.name} {c.argument}".ljust(20), style="bold").append(f"{c.help}\n")
        text.rstrip()
        with VerticalScroll(id="help"):
            yield Static(text, id="help-text")
            yield Static("Esc closes this screen", id="help-footer")
