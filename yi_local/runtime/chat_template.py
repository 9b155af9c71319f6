"""Render a model's chat template the way Hugging Face's `apply_chat_template` does."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

from yi_local.errors import YiLocalError

if TYPE_CHECKING:
    from yi_local.runtime.backend import ModelInfo

ROLES = ("system", "user", "assistant")


def _raise(message: str) -> None:
    raise YiLocalError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise YiLocalError(f"the model's chat template does not compile ({e})", hint="convert the model again") from None


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


def render_chat(info: "ModelInfo", messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    if not info.chat_template:
        raise YiLocalError(
            f"{info.name} has no chat template: it is a base model, not a chat model",
            hint="use plain completion instead (`yi-local run --raw`, or /v1/completions), or a -Chat model",
        )
    return _compile(info.chat_template).render(
        messages=check_messages(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
    )
