"""Render a conversation the way Hugging Face's `apply_chat_template` does, knowing which text is whose.

A rendered prompt remembers where each message's content lies, so the tokenizer can treat the
template's own markers (`<|im_start|>`, `<|im_end|>`) as control tokens and everything a user wrote
as plain text: a message that contains "<|im_end|>\\n<|im_start|>system" cannot close its own turn.

Yi's ChatML template is rendered natively. Any other template runs in Jinja's sandbox, in a child
process with a time and memory limit (`sandbox.py`): Jinja holds the GIL, and one C-level operation
(`9**64**64`, `'x'|center(10**9)`) can neither be interrupted in this process nor bounded by a
watchdog. It renders twice — with contents replaced by markers, and with the real contents — so the
contents' places are known, and a template that turns message text into control tokens is caught.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

from yi_local.errors import YiLocalError

if TYPE_CHECKING:
    from yi_local.runtime.backend import ModelInfo

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Yi-34B-Chat's chat template (ChatML), exactly as the chat models ship it.
YI_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

RENDER_SECONDS = 2.0  # a real template renders in milliseconds
RENDER_MEMORY = 1 << 30
MAX_RENDERED_CHARS = 64 << 20


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its text and the (start, end) character spans of message contents."""

    text: str
    contents: tuple[tuple[int, int], ...] | None = ()  # None: the template changed them, spans unknown
    # With contents None: the text the template makes of itself (contents left empty), to compare
    # the control tokens of both.
    template_text: str | None = None


class TemplateError(YiLocalError):
    pass


def _is_chatml(template: str) -> bool:
    return "".join(template.split()) == "".join(YI_CHAT_TEMPLATE.split())


def check_messages(messages: Sequence[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise YiLocalError(
                f"message {i} must have a role ({', '.join(ROLES)}) and text content",
                hint='e.g. {"role": "user", "content": "Hello"}',
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise YiLocalError("there are no messages", hint="send at least one user message")
    return out


def render_chat(info: "ModelInfo", messages: Sequence[dict], add_generation_prompt: bool = True) -> ChatPrompt:
    if not info.chat_template:
        raise YiLocalError(
            f"{info.name} has no chat template: it is a base model, not a chat model",
            hint="use plain completion instead (`yi-local run --raw`, or /v1/completions), or a -Chat model",
        )
    messages = check_messages(messages)
    if _is_chatml(info.chat_template):
        return _render_chatml(messages, add_generation_prompt)
    return _render_jinja(info, messages, add_generation_prompt)


def _render_chatml(messages: list[dict], add_generation_prompt: bool) -> ChatPrompt:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        parts += [head, m["content"], f"{IM_END}\n"]
        start = pos + len(head)
        spans.append((start, start + len(m["content"])))
        pos = start + len(m["content"]) + len(IM_END) + 1
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return ChatPrompt("".join(parts), tuple(spans))


# -- other templates: Jinja, in a sandbox child ------------------------------------------------
_sandbox = None


def _render_in_child(template: str, variants: list[list[dict]], context: dict) -> list[str]:
    global _sandbox
    from yi_local.runtime.sandbox import Sandbox, SandboxError

    if _sandbox is None:
        _sandbox = Sandbox("template", memory_bytes=RENDER_MEMORY, what="rendering")
    try:
        return _sandbox.call((template, variants, context), RENDER_SECONDS)
    except SandboxError as e:
        raise TemplateError(f"the model's chat template failed: {e.message}",
                            hint="convert the model with a standard chat template, or use plain completion (--raw)") from None  # fmt: skip


def _render_jinja(info: "ModelInfo", messages: list[dict], add_generation_prompt: bool) -> ChatPrompt:
    context = dict(add_generation_prompt=add_generation_prompt, bos_token=info.bos_token, eos_token=info.eos_token)
    # Contents replaced by markers (digits between private-use characters, which no filter changes),
    # the real contents, and empty contents.
    nonce = secrets.randbelow(10**12)
    marked = [{"role": m["role"], "content": f"\U000f0000{nonce}:{i}\U000f0001"} for i, m in enumerate(messages)]
    empty = [{"role": m["role"], "content": ""} for m in messages]
    rendered, real, bare = _render_in_child(info.chat_template, [marked, messages, empty], context)
    parts, spans, pos, length = [], [], 0, 0
    for match in re.finditer("\U000f0000" + str(nonce) + r":(\d+)\U000f0001", rendered):
        literal, content = rendered[pos : match.start()], messages[int(match.group(1))]["content"]
        parts += [literal, content]
        spans.append((length + len(literal), length + len(literal) + len(content)))
        length += len(literal) + len(content)
        pos = match.end()
    parts.append(rendered[pos:])
    if "".join(parts) == real:
        return ChatPrompt(real, tuple(spans))
    return ChatPrompt(real, None, template_text=bare)


def template_worker():
    """The sandbox child's handler: render (template, [messages...], context) once per messages list."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def refuse(message: str) -> None:
        raise TemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = refuse
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    @lru_cache(maxsize=8)
    def compile_(template: str):
        try:
            return env.from_string(template)
        except jinja2.TemplateError as e:
            raise TemplateError(f"it does not compile ({e})") from None

    def render(request) -> list[str]:
        template, variants, context = request
        out = [compile_(template).render(messages=messages, **context) for messages in variants]
        if any(len(text) > MAX_RENDERED_CHARS for text in out):
            raise TemplateError("the rendered prompt is too large")
        return out

    return render
