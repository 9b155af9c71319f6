"""The chat app: a conversation that streams replies from the runtime's events, slash commands, sessions.

The model loads in a worker thread while the screen is already live. Each reply is generated in a
worker thread that hands the runtime's events to the UI through a `Handoff`, which never makes the model
wait for the screen; the UI takes what has come once per frame and renders it incrementally, and counts
the reply done (status, session save) only once all of it is on screen. Esc sets the reply's cancel
event: the runtime ends it at the next token and the text written so far stays. A named session is
saved after every reply and held (a lock) while the app has it open; a save that fails is reported in
the app and the conversation stays on screen. Its KV cache is saved beside it after each reply and
loaded when it resumes (`tui.session_state`), so that a long conversation is not evaluated again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Awaitable, Callable

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, ProgressBar, Static

from tui.commands import COMMANDS, matches, parse
from tui.handoff import Handoff
from tui.pacing import FramePacer
from tui.screens.help import HelpScreen
from tui import session_state
from tui.session import (
    Session,
    check_setting,
    delete_session,
    list_sessions,
    load_session,
    lock_session,
    save_session,
    session_state_size,
)
from tui.widgets.messages import ChatLog, NoticeMessage, ReplyMessage, UserMessage
from tui.widgets.prompt import PromptInput
from tui.widgets.status import StatusBar
from yi_local.errors import YiLocalError
from yi_local.locks import Lock
from yi_local.runtime import Finish, SamplingParams, TextDelta
from yi_local.runtime.backend import Backend, ContextOverflowError
from yi_local.runtime.kv_state import DEFAULT_MAX_BYTES
from yi_local.runtime.params import SAMPLING_LIMITS
from yi_local.units import format_size

Loader = Callable[[Callable[[float], None]], Backend]  # called with a progress callback (0..1)

# Warn when a turn leaves less than this share of the context free.
CONTEXT_WARNING = 0.85
# Quitting waits this long for the last reply's KV cache to be saved (a 20K-token Yi-6B one is 1.25 GiB).
STATE_SAVE_WAIT = 60.0


class ChatApp(App[None]):
    CSS_PATH = "chat.tcss"
    TITLE = "yi-local chat"
    BINDINGS = [
        Binding("escape", "stop_reply", "Stop reply", show=True),
        Binding("f1", "help", "Help", show=True),
        Binding("ctrl+q", "quit", "Quit", show=True, priority=True),
    ]

    def __init__(self, loader: Loader, session: Session | None = None, session_name: str | None = None,
                 base_params: SamplingParams | None = None, session_lock: Lock | None = None,
                 max_state_bytes: int = DEFAULT_MAX_BYTES) -> None:  # fmt: skip
        """`session_lock`: the lock on `session_name` when the caller took it; else the app takes it.
        `max_state_bytes`: the largest KV cache saved with a session (0: none)."""
        super().__init__()
        self.loader = loader
        self.session = session or Session()
        self.session_name = session_name  # autosaved after every reply when set
        self.session_lock = session_lock or (lock_session(session_name) if session_name else None)
        self.base_params = base_params or SamplingParams()
        self.backend: Backend | None = None
        self.load_error: YiLocalError | None = None
        self.cancel: threading.Event | None = None  # set while a reply is generating
        self.max_state_bytes = max_state_bytes
        self._state_notes: set[str] = set()  # said once each
        self._state_thread: threading.Thread | None = None  # the latest KV cache save
        self._state_epoch = 0  # /load, /clear, /delete: saves scheduled before them are skipped

    # -- layout ------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar()
        yield ProgressBar(total=100, show_eta=False, id="loading")
        yield ChatLog()
        yield Static("", id="hint", classes="hidden")
        yield PromptInput(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.status.state = "loading model…"
        for message in self.session.messages:
            self._show(message["role"], message["content"])
        self.query_one(PromptInput).focus()
        self._load()

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    @property
    def generating(self) -> bool:
        return self.cancel is not None

    def _show(self, role: str, text: str) -> None:
        self.log_view.add(UserMessage(text) if role == "user" else ReplyMessage(text))

    def notice(self, text: str, kind: str = "info") -> None:
        self.log_view.add(NoticeMessage(text, kind))

    # -- loading -----------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        bar = self.query_one("#loading", ProgressBar)

        def progress(p: float) -> None:
            if self.is_running:
                self.call_from_thread(bar.update, progress=100 * p)

        try:
            backend = self.loader(progress)
        except YiLocalError as e:
            self.call_from_thread(self._load_failed, e)
            return
        except Exception as e:  # llama.cpp and ctypes raise assorted errors for unloadable files
            self.call_from_thread(self._load_failed, YiLocalError(f"the model could not be loaded ({e})"))
            return
        for note in backend.info.notes:
            self.call_from_thread(self.notice, note)
        if self.session_name:
            self.call_from_thread(setattr, self.status, "state", "loading the saved KV cache…")
            note = session_state.resume(backend, self.session_name, self.session)
            if note:
                self.call_from_thread(self.notice, note)
        self.call_from_thread(self._loaded, backend)

    @work(thread=True, group="state")
    def _resume_state(self, name: str, session: Session) -> None:
        """After /load: that session's saved KV cache, when it has one (before its next reply)."""
        assert self.backend is not None
        note = session_state.resume(self.backend, name, session)
        if note:
            self.call_from_thread(self.notice, note)

    def _save_state(self, name: str, digest: str) -> None:
        """The KV cache after a reply, saved with session `name` in a thread of its own (a long one takes
        seconds), after the save before it; quitting waits for it (`on_unmount`), so the last reply's
        state is not lost."""
        backend, previous, loop = self.backend, self._state_thread, asyncio.get_running_loop()
        epoch = self._state_epoch
        if backend is None:
            return

        def save() -> None:
            if previous is not None:
                previous.join()
            if epoch != self._state_epoch:  # the model's cache no longer holds that conversation, or it was deleted
                return
            note = session_state.save(backend, name, digest, self.max_state_bytes)
            if note and note not in self._state_notes:
                self._state_notes.add(note)
                try:  # never blocks on the UI: it may be waiting for this thread to end
                    loop.call_soon_threadsafe(self.notice, note)
                except RuntimeError:
                    pass  # the app is gone

        self._state_thread = threading.Thread(target=save, name="yi-local-save-state", daemon=True)
        self._state_thread.start()

    def _loaded(self, backend: Backend) -> None:
        self.backend = backend
        info = backend.info
        self.query_one("#loading").add_class("hidden")
        self.status.model = f"{info.name} {info.quantization}"
        self.status.offload = f"{info.backend} {info.offload}"
        self._update_context(0)
        self.status.state = ""
        self.sub_title = info.name

    def _load_failed(self, error: YiLocalError) -> None:
        self.load_error = error
        self.query_one("#loading").add_class("hidden")
        self.status.state = "no model"
        self.notify(str(error), title="Could not load the model", severity="error", timeout=30)
        self.notice(f"Could not load the model: {error.message}\n"
                    f"{error.hint or 'Check the path, then start yi-local chat again.'}\n"
                    "Commands still work: /help, /sessions, /quit.", kind="error")  # fmt: skip

    def _update_context(self, used: int) -> None:
        if self.backend is not None:
            self.status.context = f"ctx {used}/{self.backend.info.n_ctx}"

    # -- input -------------------------------------------------------------------------------
    def on_text_area_changed(self, event: PromptInput.Changed) -> None:
        hint = self.query_one("#hint", Static)
        text = event.text_area.text
        if text.startswith("/") and " " not in text and "\n" not in text:
            found = matches(text)
            hint.update("  ".join(f"{n} {COMMANDS[n].argument}".strip() for n in found) or "no such command")
            hint.remove_class("hidden")
        else:
            hint.add_class("hidden")

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if text.startswith("/"):
            self.run_command(text)
        else:
            self.send(text)

    def send(self, text: str) -> None:
        if self.generating:
            self.notify("A reply is still being written: Esc stops it.", severity="warning")
            return
        if self.backend is None:
            self.notify("No model is loaded." if self.load_error else "The model is still loading.",
                        severity="error" if self.load_error else "warning")  # fmt: skip
            return
        self.session.messages.append({"role": "user", "content": text})
        self._show("user", text)
        self._reply()

    def _reply(self) -> None:
        view = ReplyMessage()
        mounted = self.log_view.add(view)
        self.cancel = threading.Event()
        self.status.state = "writing…"
        self._show_reply(view, mounted, self.session.chat_messages(), self.session.settings.sampling(self._params()),
                         self.cancel)  # fmt: skip

    def _params(self) -> SamplingParams:
        """Every sampling flag the chat was started with; /temperature, /top_p, /max_tokens override theirs."""
        b = self.base_params
        return dataclasses.replace(b, stop=list(b.stop), logit_bias=dict(b.logit_bias))

    @work(thread=True, group="reply")
    def _generate(self, inbox: Handoff, messages: list[dict], params: SamplingParams, cancel: threading.Event) -> None:
        """The model's side: runs at the model's speed, handing events over without waiting for the screen."""
        backend = self.backend
        assert backend is not None
        try:
            prompt = backend.chat_tokens(messages)
            for event in backend.generate(prompt, params, cancel):
                if isinstance(event, Finish):
                    inbox.put(event, last=True)
                elif event.text:
                    inbox.put(event)
        except YiLocalError as e:  # ContextOverflowError included
            inbox.put(e, last=True)

    @work(group="reply-view")
    async def _show_reply(self, view: ReplyMessage, mounted: Awaitable, messages: list[dict], params: SamplingParams,
                          cancel: threading.Event) -> None:  # fmt: skip
        """The screen's side. The model starts as soon as the message and the reply's place are mounted, and
        their first paint runs beside its prompt evaluation (waiting for that paint first kept a short reply
        tens of milliseconds longer from the screen); then what it writes is rendered at most once a frame,
        frames spaced so that the UI never slows the model (`tui.pacing`), and the text gathers in between."""
        ui_cpu = time.thread_time()
        await mounted
        inbox: Handoff[TextDelta | Finish | YiLocalError] = Handoff()
        prompt = self.query_one(PromptInput)
        blink, prompt.cursor_blink = prompt.cursor_blink, False  # a blink is a paint twice a second: the model's time too
        self._generate(inbox, messages, params, cancel)
        await self._next_paint()
        pacer = FramePacer()
        assert self.backend is not None
        gap = pacer.first_gap(time.thread_time() - ui_cpu, model_on_cpu=self.backend.info.runs_on_cpu)
        try:
            while True:
                events = await inbox.take(gap)
                text = "".join(e.text for e in events if isinstance(e, TextDelta))
                end = events[-1]
                if isinstance(end, Finish):  # the last text, the note and the status line in one render
                    await self._finished(view, end, text)
                    return
                if text:
                    await view.write(text)
                if isinstance(end, YiLocalError):
                    self._failed(view, end, context_full=isinstance(end, ContextOverflowError))
                    return
                gap = pacer.gap()  # from the last frame's layout and paint, and this render
        finally:
            prompt.cursor_blink = blink

    async def _finished(self, view: ReplyMessage, finish: Finish, text: str) -> None:
        used = finish.usage.prompt_tokens + finish.usage.completion_tokens
        with self.batch_update():  # one frame: never the speed beside a reply still missing its end
            await view.write(text, {"cancelled": "stopped", "length": "cut at the token limit"}.get(finish.reason))
            self._update_context(used)
            self.status.speed = f"{finish.timings.generate_tps:.1f} tok/s"
            self.status.state = ""
        await self._next_paint()  # the whole reply on screen first; then the session (a save waits for the disk)
        self.cancel = None
        self.session.messages.append({"role": "assistant", "content": view.text})
        n_ctx = self.backend.info.n_ctx if self.backend else 0
        if n_ctx and used + self.session.settings.max_tokens > CONTEXT_WARNING * n_ctx:
            self.notify(f"The conversation fills {used} of {n_ctx} context tokens. "
                        "/drop forgets the oldest turn; /clear starts over.",
                        title="Context nearly full", severity="warning", timeout=15)  # fmt: skip
        if self.session_name and self._save(self.session_name, quiet=True):
            self._save_state(self.session_name, self.session.digest())

    async def _next_paint(self) -> None:
        """Returns once the screen shows what has changed so far."""
        painted = asyncio.get_running_loop().create_future()
        self.call_after_refresh(lambda: painted.done() or painted.set_result(None))
        try:  # a screen dismissed before its next idle drops its callbacks: never wait forever
            await asyncio.wait_for(painted, 1.0)
        except asyncio.TimeoutError:
            pass

    def _failed(self, view: ReplyMessage, error: YiLocalError, context_full: bool = False) -> None:
        self.cancel = None
        view.remove()
        self.status.state = ""
        if context_full:
            self.notify(f"{error.message}. /drop forgets the oldest turn; /clear starts over.",
                        title="Context full", severity="error", timeout=20)  # fmt: skip
        else:
            self.notify(str(error), title="Could not reply", severity="error", timeout=20)

    def action_stop_reply(self) -> None:
        if self.cancel is not None:
            self.cancel.set()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    # -- slash commands ----------------------------------------------------------------------
    def run_command(self, text: str) -> None:
        name, arg = parse(text)
        handler = getattr(self, f"cmd_{name.lstrip('/')}", None) if name in COMMANDS else None
        if handler is None:
            self.notify(f"Unknown command {name}. /help lists the commands.", severity="error")
            return
        try:
            handler(arg)
        except YiLocalError as e:
            self.notify(str(e), severity="error")

    def _set_number(self, field: str, arg: str) -> None:
        settings = self.session.settings
        if not arg:
            self.notify(f"{field} is {getattr(settings, field)}")
            return
        limit = SAMPLING_LIMITS[field]
        try:
            value = check_setting(field, (int if limit.integer else float)(arg))
        except ValueError:
            raise YiLocalError(f"/{field} needs {limit.describe()}, not {arg[:40]!r}") from None
        setattr(settings, field, value)
        self.notify(f"{field} set to {value}")

    def cmd_temperature(self, arg: str) -> None:
        self._set_number("temperature", arg)

    def cmd_top_p(self, arg: str) -> None:
        self._set_number("top_p", arg)

    def cmd_max_tokens(self, arg: str) -> None:
        self._set_number("max_tokens", arg)

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.notify(f"System prompt: {self.session.system!r}" if self.session.system else "No system prompt.")
            return
        self.session.system = None if arg.lower() == "none" else arg
        self.notify("System prompt removed." if self.session.system is None else "System prompt set.")

    def cmd_clear(self, arg: str) -> None:
        if self.generating:
            raise YiLocalError("a reply is being written: press Esc first")
        self._state_epoch += 1
        self.session.messages.clear()
        self.log_view.clear_messages()
        self._update_context(0)
        if self.backend is not None:
            self.backend.reset()

    def cmd_drop(self, arg: str) -> None:
        if self.generating:
            raise YiLocalError("a reply is being written: press Esc first")
        try:
            n = int(arg) if arg else 1
        except ValueError:
            n = 0
        if n < 1:
            raise YiLocalError(f"/drop needs a number of turns (1 or more), not {arg[:40]!r}")
        dropped = self.session.drop_oldest_turns(n)
        self._redraw()
        self.notify(f"Forgot the {dropped} oldest turn{'s' if dropped != 1 else ''}." if dropped else "Nothing to drop.")

    def cmd_retry(self, arg: str) -> None:
        if self.generating:
            raise YiLocalError("a reply is being written: press Esc first")
        if self.backend is None:
            raise YiLocalError("no model is loaded")
        messages = self.session.messages
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise YiLocalError("there is nothing to retry yet")
        self._redraw()
        self._reply()

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise YiLocalError("/save needs a name", hint="e.g. /save trip-plans")
        lock = self._hold(arg)
        if self._save(arg):
            self._switch_session(arg, lock)
            if self.backend is not None and not self.generating:
                self._save_state(arg, self.session.digest())
        elif lock is not self.session_lock:
            lock.release()

    def _save(self, name: str, quiet: bool = False) -> bool:
        """Save the conversation as `name`; on failure say why in the app (the conversation stays here)."""
        try:
            path = save_session(name, self.session)
        except (OSError, YiLocalError) as e:
            reason = e.message if isinstance(e, YiLocalError) else f"{e.strerror or e}"
            self.notify(f"{reason}\nThe conversation is kept here: free some space, or /save it under another "
                        "name once that can work.", title=f"Could not save the session {name}",
                        severity="error", timeout=30)  # fmt: skip
            return False
        if not quiet:
            self.notify(f"Saved as {name} ({path})")
        return True

    def _hold(self, name: str) -> Lock:
        """The lock on session `name`: the one held already, or a new one (refused when another chat has it)."""
        if name == self.session_name and self.session_lock is not None:
            return self.session_lock
        return lock_session(name)

    def _switch_session(self, name: str | None, lock: Lock | None) -> None:
        if self.session_lock is not None and self.session_lock is not lock:
            self.session_lock.release()
        self.session_name, self.session_lock = name, lock

    def cmd_load(self, arg: str) -> None:
        if self.generating:
            raise YiLocalError("a reply is being written: press Esc first")
        if not arg:
            raise YiLocalError("/load needs a name", hint="/sessions lists them")
        lock = self._hold(arg)
        self._state_epoch += 1
        try:
            session = load_session(arg)
        except YiLocalError:
            if lock is not self.session_lock:
                lock.release()
            raise
        self.session = session
        self._switch_session(arg, lock)
        self._redraw()
        if self.backend is not None:
            self.backend.reset()
            self._resume_state(arg, self.session)
        self.notify(f"Loaded {arg}: {len(self.session.messages)} messages")

    def cmd_sessions(self, arg: str) -> None:
        names = list_sessions()
        if not names:
            self.notice("No saved sessions yet: /save NAME makes one.")
            return

        def shown(name: str) -> str:
            size = session_state_size(name)
            return f"{name} (KV cache {format_size(size)})" if size is not None else name

        self.notice("Saved sessions: " + ", ".join(shown(n) for n in names))

    def cmd_delete(self, arg: str) -> None:
        if not arg:
            raise YiLocalError("/delete needs a name", hint="/sessions lists them")
        lock = self._hold(arg)
        self._state_epoch += 1
        if self._state_thread is not None:  # a save already writing must not leave a state without its session
            self._state_thread.join(timeout=STATE_SAVE_WAIT)
        try:
            if not delete_session(arg):
                raise YiLocalError(f"there is no session {arg!r}", hint="/sessions lists the saved ones")
        finally:
            if lock is not self.session_lock:
                lock.release()
        if arg == self.session_name:  # the conversation stays on screen, no longer saved
            self._switch_session(None, None)
        self.notify(f"Deleted the session {arg} and its saved KV cache.")

    def cmd_help(self, arg: str) -> None:
        self.action_help()

    def cmd_quit(self, arg: str) -> None:
        self.exit()

    def _redraw(self) -> None:
        self.log_view.clear_messages()
        for message in self.session.messages:
            self._show(message["role"], message["content"])

    def on_unmount(self) -> None:
        if self.cancel is not None:
            self.cancel.set()
        if self._state_thread is not None:
            self._state_thread.join(timeout=STATE_SAVE_WAIT)
        if self.session_lock is not None:
            self.session_lock.release()
