"""Render a conversation the way Hugging Face's `apply_chat_template` does, knowing which text is whose.

A rendered prompt remembers where each message's content lies, so the tokenizer can treat the
template's own markers (`<|im_start|>`, `<|im_end|>`) as control tokens and everything a user wrote
as plain text: a message that contains "<|im_end|>\\n<|im_start|>system" cannot close its own turn.

Yi's ChatML template is rendered natively. Any other template runs in Jinja's sandbox with its
contents replaced by markers (found again in the output), under a time limit enforced by a trace
function: Jinja holds the GIL, so a watchdog thread could not stop a template that loops forever.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
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
MAX_RENDERED_CHARS = 64 << 20


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its text and the (start, end) character spans of message contents."""

    text: str
    contents: tuple[tuple[int, int], ...] | None = ()  # None: the template changed them, spans unknown


class TemplateError(YiLocalError):
    pass


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


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


# -- other templates: Jinja, sandboxed and timed ------------------------------------------------
def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        # `'x' * 10**10` is one operation, which no time limit can interrupt: bound its result instead.
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                _raise("an exponent over 64")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                        _raise("a repetition too large to render")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as e:
        raise YiLocalError(f"the model's chat template does not compile ({e})", hint="convert the model again") from None


def render_with_deadline(template, seconds: float = RENDER_SECONDS, **context) -> str:
    """template.render(**context), stopped with an error once it has run for `seconds`."""
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateError(f"the model's chat template did not finish rendering within {seconds:g} s",
                                hint="the template loops too long; convert the model with a standard template")  # fmt: skip
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        out = template.render(**context)
    except YiLocalError:
        raise
    except Exception as e:  # jinja2 and the template's own code raise assorted types
        raise TemplateError(f"the model's chat template failed: {type(e).__name__}: {e}"[:500],
                            hint="convert the model again, or use plain completion (--raw)") from None  # fmt: skip
    finally:
        sys.settrace(previous)
    if len(out) > MAX_RENDERED_CHARS:
        _raise("the rendered prompt is too large")
    return out


def _render_jinja(info: "ModelInfo", messages: list[dict], add_generation_prompt: bool) -> ChatPrompt:
    template = _compile(info.chat_template)
    context = dict(add_generation_prompt=add_generation_prompt, bos_token=info.bos_token, eos_token=info.eos_token)
    # Render with each content replaced by a marker (digits between private-use characters, which
    # no filter changes), put the contents back where the markers are, and check the result against
    # a render of the real contents: a template that transforms contents (`| trim`) gives no spans.
    nonce = secrets.randbelow(10**12)
    marked = [{"role": m["role"], "content": f"\U000f0000{nonce}:{i}\U000f0001"} for i, m in enumerate(messages)]
    rendered = render_with_deadline(template, messages=marked, **context)
    real = render_with_deadline(template, messages=messages, **context)
    parts, spans, pos, length = [], [], 0, 0
    for match in re.finditer("\U000f0000" + str(nonce) + r":(\d+)\U000f0001", rendered):
        literal, content = rendered[pos : match.start()], messages[int(match.group(1))]["content"]
        parts += [literal, content]
        spans.append((length + len(literal), length + len(literal) + len(content)))
        length += len(literal) + len(content)
        pos = match.end()
    parts.append(rendered[pos:])
    text = "".join(parts)
    return ChatPrompt(real, tuple(spans) if text == real else None)
