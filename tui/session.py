"""A chat session: messages, system prompt and sampling settings, saved as JSON under the data folder."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from yi_local.atomic import write_atomic
from yi_local.errors import YiLocalError
from yi_local.paths import home
from yi_local.runtime import SamplingParams

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Settings:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024

    def sampling(self, base: SamplingParams | None = None) -> SamplingParams:
        params = base or SamplingParams()
        params.temperature, params.top_p, params.max_tokens = self.temperature, self.top_p, self.max_tokens
        return params


@dataclass
class Session:
    messages: list[dict] = field(default_factory=list)  # user/assistant turns, in order
    system: str | None = None
    settings: Settings = field(default_factory=Settings)

    def chat_messages(self) -> list[dict]:
        """What the model sees: the system prompt, then the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def drop_oldest_turn(self) -> bool:
        """Forget the oldest user message and the replies to it; False when nothing is left to drop."""
        if not self.messages:
            return False
        del self.messages[0]
        while self.messages and self.messages[0]["role"] != "user":
            del self.messages[0]
        return True

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Session":
        data = json.loads(text)
        messages = [
            {"role": m["role"], "content": m["content"]}
            for m in data.get("messages", [])
            if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        ]
        return cls(messages=messages, system=data.get("system"), settings=Settings(**data.get("settings", {})))


def sessions_dir() -> Path:
    return home() / "sessions"


def _path(name: str) -> Path:
    if not _NAME.match(name):
        raise YiLocalError(f"{name!r} is not a session name", hint="use letters, digits, '.', '_' or '-' (up to 64)")
    return sessions_dir() / f"{name}.json"


def save_session(name: str, session: Session) -> Path:
    path = _path(name)
    write_atomic(path, session.to_json())
    return path


def load_session(name: str) -> Session:
    path = _path(name)
    try:
        return Session.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise YiLocalError(f"there is no session {name!r}", hint="/sessions lists the saved ones") from None
    except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise YiLocalError(f"the session file {path} is damaged ({e})", hint="delete it or save the session again") from None


def list_sessions() -> list[str]:
    folder = sessions_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
