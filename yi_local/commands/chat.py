"""Chat with a model in the terminal (a Textual app).

Enter sends, Ctrl+J makes a new line, Esc stops a reply (keeping what was written), Up/Down recall
earlier prompts, F1 or /help shows keys and commands. Sessions are saved as JSON under
$YI_LOCAL_HOME/sessions (default: the platform's user data folder). A session is open in one chat at
a time: a second `--session NAME` (or /save NAME, /load NAME) of it is refused, naming the process.
With each session its KV cache is saved after every reply (NAME.kv, up to --max-state-size) and loaded
when the session resumes, so a long conversation is not evaluated again; it is used only with the same
model file, --ctx, --kv-type and --flash-attn, else the history is evaluated as before. /sessions shows
their sizes, /delete NAME removes a session with its KV cache.

Examples:
  yi-local chat Yi-6B-Chat-Q4_K_M.gguf
  yi-local chat Yi-6B-Chat-Q4_K_M.gguf --system "Answer briefly." --session work
"""

from __future__ import annotations

import argparse

from yi_local.runtime.kv_state import DEFAULT_MAX_BYTES
from yi_local.runtime.params import CHAT_MAX_TOKENS
from yi_local.units import format_size

from yi_local.commands.options import (
    add_model_arg,
    add_runtime_args,
    add_sampling_args,
    load_options,
    resolve_model,
    sampling_params,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--system", default=None, help="system prompt for a new conversation")
    p.add_argument("--session", default=None, metavar="NAME",
                   help="resume the saved session NAME (or start it), saving after every reply")  # fmt: skip
    p.add_argument("--max-state-size", type=_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                   help="save a session's KV cache with it when it takes at most SIZE, e.g. 512M or 4G; 0: never "
                   f"(default {format_size(DEFAULT_MAX_BYTES)})")  # fmt: skip
    add_runtime_args(p)
    add_sampling_args(p, max_tokens=CHAT_MAX_TOKENS)


def _size(text: str) -> int:
    from yi_local.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _session(args: argparse.Namespace, base):
    """The session the chat starts with: `--session NAME`'s file when it exists (checked), else a new one."""
    from tui.session import Session, Settings, load_session, session_exists

    if args.session is not None and session_exists(args.session):
        session = load_session(args.session)
    else:
        session = Session(settings=Settings(temperature=base.temperature, top_p=base.top_p, max_tokens=base.max_tokens))
    if args.system:
        session.system = args.system
    return session


def build_app(args: argparse.Namespace, model: str, backend_name: str, session=None, session_lock=None):
    """The chat app for these arguments, loading `model` in the background once it starts.

    `session` and `session_lock`: what `run` loaded and locked before the model; without them they are
    made here (the app takes the lock on `--session NAME` itself).
    """
    from tui.app import ChatApp
    from yi_local.runtime import load_backend

    base = sampling_params(args)
    session = session if session is not None else _session(args, base)

    def loader(progress):
        return load_backend(model, load_options(args, on_progress=progress), backend=backend_name)

    return ChatApp(loader, session=session, session_name=args.session, base_params=base, session_lock=session_lock,
                   max_state_bytes=args.max_state_size)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from tui.session import lock_session

    base = sampling_params(args)  # bad flags fail before a pull or conversion
    load_options(args)
    # The session is checked and held before anything slow happens: a bad name, a damaged file or a
    # session open in another chat ends here, before the model is pulled or loaded.
    lock = lock_session(args.session) if args.session is not None else None
    try:
        session = _session(args, base)
        model, backend_name = resolve_model(args)  # a pull or conversion happens here, before the app starts
        build_app(args, model, backend_name, session, lock).run()
    finally:
        if lock is not None:
            lock.release()
    return 0
