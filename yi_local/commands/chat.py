"""Chat with a model in the terminal (a Textual app).

Enter sends, Ctrl+J makes a new line, Esc stops a reply (keeping what was written), Up/Down recall
earlier prompts, F1 or /help shows keys and commands. Sessions are saved as JSON under
$YI_LOCAL_HOME/sessions (default: the platform's user data folder).

Examples:
  yi-local chat Yi-6B-Chat-Q4_K_M.gguf
  yi-local chat Yi-6B-Chat-Q4_K_M.gguf --system "Answer briefly." --session work
"""

from __future__ import annotations

import argparse

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
    add_runtime_args(p)
    add_sampling_args(p, max_tokens=1024)


def build_app(args: argparse.Namespace, model: str, backend_name: str):
    """The chat app for these arguments, loading `model` in the background once it starts."""
    from tui.app import ChatApp
    from tui.session import Session, Settings, list_sessions, load_session
    from yi_local.runtime import load_backend

    base = sampling_params(args)
    if args.session and args.session in list_sessions():
        session = load_session(args.session)
    else:
        session = Session(settings=Settings(temperature=base.temperature, top_p=base.top_p, max_tokens=base.max_tokens))
    if args.system:
        session.system = args.system

    def loader(progress):
        return load_backend(model, load_options(args, on_progress=progress), backend=backend_name)

    return ChatApp(loader, session=session, session_name=args.session, base_params=base)


def run(args: argparse.Namespace) -> int:
    sampling_params(args)  # bad flags fail before a pull or conversion
    model, backend_name = resolve_model(args)  # a pull or conversion happens here, before the app starts
    build_app(args, model, backend_name).run()
    return 0
