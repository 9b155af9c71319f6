"""The chat's slash commands as data: name, argument, help; parsing and completion."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    argument: str
    help: str


COMMANDS = {
    c.name: c
    for c in (
        Command("/system", "[TEXT]", "set the system prompt ('none' removes it)"),
        Command("/temperature", "X", "sampling temperature, 0 for greedy"),
        Command("/top_p", "X", "nucleus sampling threshold (0 < X ≤ 1)"),
        Command("/max_tokens", "N", "longest reply in tokens"),
        Command("/clear", "", "start a new conversation, keeping the settings"),
        Command("/drop", "[N]", "forget the N oldest turns (default 1) for room"),
        Command("/retry", "", "generate the last reply again"),
        Command("/save", "NAME", "save the conversation and settings"),
        Command("/load", "NAME", "load a saved conversation"),
        Command("/sessions", "", "list saved conversations and the size of their saved KV caches"),
        Command("/delete", "NAME", "delete a saved conversation and its KV cache"),
        Command("/help", "", "keys and commands"),
        Command("/quit", "", "leave"),
    )
}


def parse(text: str) -> tuple[str, str]:
    """'/temperature 0.5' -> ('/temperature', '0.5')."""
    name, _, arg = text.strip().partition(" ")
    return name.lower(), arg.strip()


def matches(prefix: str) -> list[str]:
    prefix = prefix.lower()
    return [name for name in COMMANDS if name.startswith(prefix)]


def complete(text: str) -> str | None:
    """Complete a command name being typed: the unique match, or the matches' common prefix."""
    if not text.startswith("/") or " " in text:
        return None
    found = matches(text)
    if not found:
        return None
    if len(found) == 1:
        return found[0] + " "
    common = found[0]
    for name in found[1:]:
        while not name.startswith(common):
            common = common[:-1]
    return common if len(common) > len(text) else None
