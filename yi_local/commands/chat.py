"""Chat with a model in the terminal (a Textual app).

Enter sends, Ctrl+J makes a new line, Esc stops a reply (keeping what was written), Up/Down recall
earlier prompts, F1 or /help shows keys and commands. Sessions are saved as JSON under
$YI_LOCAL_HOME/sessions (default: the platform's user data folder). A session is open in one chat at
a time: a second `--session NAME` (or /save NAME, /load NAME) of it is refused, naming the process.

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


def run(args: argparse.Namespace) -> int:
    from tui.app import ChatApp
    from tui.session import Session, Settings, load_session, lock_session, session_exists
    from yi_local.runtime import load_backend

    # The session is checked and held before anything slow happens: a bad name, a damaged file or a
    # session open in another chat ends here, before the model is pulled or loaded.
    lock = lock_session(args.session) if args.session is not None else None
    try:
        if lock is not None and session_exists(args.session):
            session = load_session(args.session)
        else:
            session = Session(settings=Settings(temperature=args.temperature, top_p=args.top_p,
                                                max_tokens=args.max_tokens))  # fmt: skip
        if args.system:
            session.system = args.system

        model, backend_name = resolve_model(args)  # a pull or conversion happens here, before the app starts

        def loader(progress):
            return load_backend(model, load_options(args, on_progress=progress), backend=backend_name)

        ChatApp(loader, session=session, session_name=args.session, base_params=sampling_params(args),
                session_lock=lock).run()  # fmt: skip
    finally:
        if lock is not None:
            lock.release()
    return 0
