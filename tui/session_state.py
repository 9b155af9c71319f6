"""A named session's KV cache: loaded when the session resumes, saved after each reply.

A resumed conversation of 20K tokens would otherwise be evaluated again (minutes on a laptop) before
the first new reply. The state belongs to exactly the conversation it was saved with (its digest)
and to the model and settings (yi_local.runtime.kv_state); when anything differs, or the file is
damaged, the chat says so in one line and evaluates the history as it always did. Both functions
take a while on a long conversation: the app calls them from worker threads.
"""

from __future__ import annotations

from tui.session import Session, state_path
from yi_local.runtime.backend import Backend
from yi_local.errors import YiLocalError
from yi_local.runtime.kv_state import SlotBusy, StateTooLarge, StateUnusable, load_state, save_state
from yi_local.units import format_size


def resume(backend: Backend, name: str, session: Session) -> str | None:
    """Load session `name`'s saved KV cache into the model; the note to show (None: nothing was saved)."""
    path = state_path(name)
    if not session.messages or not path.exists():
        return None
    try:
        loaded = load_state(backend, path, bound_to=session.digest())
    except StateUnusable as e:
        return f"The saved KV cache of {name} was not used: {e.message}. The conversation is evaluated again."
    return (f"Resumed {name} from its saved KV cache ({len(loaded.tokens):,} tokens, {format_size(loaded.size)}): "
            "only new text is evaluated.")  # fmt: skip


def save(backend: Backend, name: str, digest: str, max_bytes: int) -> str | None:
    """Save the conversation's KV cache as session `name`'s (its `digest`: the conversation now); a note
    when it was not saved, None when it was (or the cap is 0: states are off; or the backend keeps none)."""
    if max_bytes <= 0 or backend.state_binding() is None:
        return None
    try:
        save_state(backend, state_path(name), max_bytes=max_bytes, bound_to=digest)
    except SlotBusy:
        return None  # the next reply began first; the state after it is saved instead
    except StateTooLarge as e:
        return f"The KV cache of {name} was not saved: {e.message} (--max-state-size sets the cap)."
    except YiLocalError as e:  # the disk: full, read-only
        return f"The KV cache of {name} was not saved: {e.message}."
    except OSError as e:
        return f"The KV cache of {name} was not saved: {e.strerror or e}."
    return None
