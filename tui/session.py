"""A chat session: messages, system prompt and sampling settings, saved as JSON under the data folder.

A session file is checked in full when it is loaded (a file edited by hand must fail there, with the
field named, not on the next message), and a session is open in one chat at a time: the chat holds
its lock, and a second one is told which process has it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from yi_local.atomic import write_atomic
from yi_local.errors import YiLocalError
from yi_local.locks import Lock
from yi_local.paths import home
from yi_local.runtime import SamplingParams
from yi_local.runtime.kv_state import remove_state, state_size
from yi_local.runtime.params import CHAT_MAX_TOKENS, SAMPLING_LIMITS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# The settings a session keeps: type and allowed range, shared by the file check and the slash commands.
# The sampling settings a chat keeps with its session; defaults and ranges are the runtime's.
SETTINGS = ("temperature", "top_p", "max_tokens")
_DEFAULTS = SamplingParams()


@dataclass
class Settings:
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    max_tokens: int = CHAT_MAX_TOKENS

    def sampling(self, base: SamplingParams | None = None) -> SamplingParams:
        params = base or SamplingParams()
        params.temperature, params.top_p, params.max_tokens = self.temperature, self.top_p, self.max_tokens
        return params


def check_setting(name: str, value) -> float | int:
    """`value` for the setting `name` if it has the right type and range; ValueError saying what is wrong."""
    limit = SAMPLING_LIMITS[name]  # the runtime's ranges
    if not limit.contains(value):
        raise ValueError(f"{name} must be {limit.describe()}, not {_shown(value)}")
    return value if limit.integer else float(value)


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

    def drop_oldest_turns(self, n: int) -> int:
        """Forget up to `n` turns; how many were. Bounded by the turns there are, not by `n`."""
        dropped = 0
        while dropped < n and self.drop_oldest_turn():
            dropped += 1
        return dropped

    def digest(self) -> str:
        """A hash of what the model sees: a saved KV cache belongs to exactly this conversation."""
        import hashlib

        text = json.dumps(self.chat_messages(), ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Session":
        """A session from its file's text; ValueError naming the first thing that is wrong."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data) -> "Session":
        _expect(data, dict, "the file")
        _no_unknown_keys(data, {"messages", "system", "settings"}, "")
        messages = _expect(data.get("messages", []), list, "'messages'")
        for i, m in enumerate(messages):
            _expect(m, dict, f"messages[{i}]")
            _no_unknown_keys(m, {"role", "content"}, f"messages[{i}]")
            if m.get("role") not in ("user", "assistant"):
                raise ValueError(f"messages[{i}].role must be 'user' or 'assistant', not {_shown(m.get('role'))}")
            _expect(m.get("content"), str, f"messages[{i}].content")
        system = data.get("system")
        if system is not None:
            _expect(system, str, "'system'")
        settings = _expect(data.get("settings", {}), dict, "'settings'")
        _no_unknown_keys(settings, set(SETTINGS), "settings")
        checked = {name: check_setting(name, value) for name, value in settings.items()}
        return cls(messages=[{"role": m["role"], "content": m["content"]} for m in messages], system=system,
                   settings=Settings(**checked))  # fmt: skip


_KINDS = {dict: "an object", list: "a list", str: "text"}


def _shown(value) -> str:
    return json.dumps(value, ensure_ascii=False)[:60]


def _expect(value, kind: type, what: str):
    if not isinstance(value, kind):
        raise ValueError(f"{what} must be {_KINDS[kind]}, not {_shown(value)}")
    return value


def _no_unknown_keys(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key {_shown(unknown[0])}{' in ' + where if where else ''}")


def sessions_dir() -> Path:
    return home() / "sessions"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise YiLocalError(f"{name!r:.80} is not a session name", hint="use letters, digits, '.', '_' or '-' (up to 64)")
    return name


def _path(name: str) -> Path:
    return sessions_dir() / f"{check_name(name)}.json"


def session_exists(name: str) -> bool:
    return _path(name).exists()


def state_path(name: str) -> Path:
    """Where the session's KV cache is saved (yi_local.runtime.kv_state), beside its JSON."""
    return sessions_dir() / f"{check_name(name)}.kv"


def session_state_size(name: str) -> int | None:
    return state_size(state_path(name))


def delete_session(name: str) -> bool:
    """Delete the session's file and its saved KV cache; False when there was no such session.

    The caller holds the session's lock (no chat has it open)."""
    path = _path(name)
    existed = path.exists() or state_path(name).exists()
    remove_state(state_path(name))
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise YiLocalError(f"cannot delete {path} ({e.strerror or e})") from None
    return existed


def save_session(name: str, session: Session) -> Path:
    path = _path(name)
    write_atomic(path, session.to_json())
    return path


def load_session(name: str) -> Session:
    path = _path(name)
    try:
        if path.exists() and not path.is_file():
            raise YiLocalError(f"the session file {path} is not a file", hint="move it away, or use another name")
        return Session.from_json(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise YiLocalError(f"there is no session {name!r}", hint="/sessions lists the saved ones") from None
    except OSError as e:
        raise YiLocalError(f"cannot read the session file {path} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or a field that is wrong
        raise YiLocalError(f"the session file {path} is damaged: {str(e)[:200]}",
                           hint="fix or delete that file, or use another session name") from None  # fmt: skip


def list_sessions() -> list[str]:
    folder = sessions_dir()
    try:
        return sorted(p.stem for p in folder.glob("*.json") if _NAME.fullmatch(p.stem)) if folder.is_dir() else []
    except OSError:
        return []


def lock_session(name: str) -> Lock:
    """Hold session `name` for this process; a YiLocalError naming the holder when another chat has it."""
    lock = Lock(f"session-{check_name(name)}", "yi-local chat")
    if not lock.try_acquire():
        raise YiLocalError(f"the session {name!r} is open in another process ({lock.holder()})",
                           hint="close that chat first, or use another session name")  # fmt: skip
    return lock
