"""The one generation loop: N sequences decoded together in one batch, each in its own slot.

A backend offers slots (sequences of one model context, each with its own KV cells), a batched
evaluation step and a sampler per slot; the engine's worker thread turns them into replies:

- Requests wait in a FIFO queue and join between steps, in the idle slot that holds the longest prefix
  of their prompt (else the one idle longest), whose cache is cut back to that prefix.
- Every step carries one token for each sequence that is generating, and at most one chunk of one
  prompt (the oldest waiting), sized to what the batch has left: streams keep flowing while a long
  prompt is read.
- Each sequence is sampled at its own batch row by its own sampler chain, and turned into events by
  its own `Reply`: stop strings, UTF-8, limits and the context's end are per sequence, and a sequence
  that reaches the end of its context ends there, never failing the others.
- A cancelled request (a client gone) leaves before the next step and frees its slot at once.

`run` and `chat` use the same engine with one slot.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from yi_local.errors import YiLocalError
from yi_local.runtime.events import Event
from yi_local.runtime.params import SamplingParams
from yi_local.runtime.reply import Reply

if TYPE_CHECKING:
    from yi_local.runtime.backend import Backend

logger = logging.getLogger(__name__)
WORKER_STACK_BYTES = 64 << 20  # llama.cpp recurses on this thread in places: room beyond the 8 MB default

Sink = Callable[["Event | BaseException | None"], None]  # events, then an error or None at the end


class QueueFullError(YiLocalError):
    pass


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    cancel: threading.Event
    sink: Sink
    reply: Reply
    stop: threading.Event = field(default_factory=threading.Event)  # the engine's own: a reader gone, shutdown
    slot: "Slot | None" = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, to be evaluated in the next step

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or self.stop.is_set()


@dataclass(eq=False)
class Slot:
    seq: int  # the sequence id in the model's context
    cache: list[int] = field(default_factory=list)  # the tokens whose keys and values the slot holds
    generated: list[bool] = field(default_factory=list)  # per cached token: sampled rather than read
    request: Request | None = None
    idle_since: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence in a batch, at positions start…; `logits`: the last one's are wanted."""

    seq: int
    tokens: list[int]
    start: int
    logits: bool


class Engine:
    def __init__(self, backend: Backend, n_slots: int, n_batch: int, max_queue: int = 64,
                 on_step: Callable[[list[Chunk]], None] | None = None) -> None:  # fmt: skip
        if n_slots > n_batch:
            raise YiLocalError(f"{n_slots} sequences need a batch of at least {n_slots} tokens",
                               hint="raise --batch or lower --parallel")  # fmt: skip
        self.backend = backend
        self.n_ctx = backend.info.n_ctx  # per sequence
        self.n_batch = n_batch
        self.max_queue = max_queue
        self.on_step = on_step  # sees each step's batch (tests check its composition)
        self.slots = [Slot(seq) for seq in range(n_slots)]
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()  # held while a step uses the model; reset() takes it too
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the callers' side (any thread) -----------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, cancel: threading.Event, sink: Sink) -> Request:
        """Queue a request; its events go to `sink` from the engine's thread, then None (or an error).
        Setting `cancel` (the caller's) or the request's own `stop` ends it before the next step."""
        if not 0 < len(prompt) < self.n_ctx:  # callers check first; an empty or overlong one would hang or spill
            raise YiLocalError(f"a prompt of {len(prompt)} tokens cannot be continued in a context of {self.n_ctx}",
                               hint="give a prompt shorter than the context")  # fmt: skip
        reply = Reply(prompt, params, self.n_ctx, self.backend.token_bytes, self.backend.token_bytes_special,
                      self.backend.is_end_of_generation)  # fmt: skip
        request = Request(prompt, params, cancel, sink, reply)
        with self._wake:
            if self._closed:
                raise YiLocalError("the model is closed", hint="load it again")
            self._drop_cancelled()
            # Requests that an idle slot takes at the next step do not wait: only the rest count.
            idle = sum(slot.request is None for slot in self.slots)
            if len(self._waiting) >= self.max_queue + idle:
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are waiting already",
                                     hint="retry shortly")  # fmt: skip
            self._waiting.append(request)
            self._start()
            self._wake.notify()
        return request

    @property
    def queued(self) -> int:
        return sum(not r.cancelled for r in list(self._waiting))

    def _drop_cancelled(self) -> None:
        """Waiting requests whose callers left give their places back at once (called holding `_wake`)."""
        if any(r.cancelled for r in self._waiting):
            dead = [r for r in self._waiting if r.cancelled]
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            for request in dead:
                _emit(request, request.reply.finish("cancelled"))
                _emit(request, None)

    @property
    def busy(self) -> int:
        return sum(slot.request is not None for slot in self.slots)

    def caches(self) -> list[tuple[list[int], list[bool]]]:
        """Copies of what each slot's cache holds (tokens, generated flags): prompts are prepared against them."""
        return [(list(slot.cache), list(slot.generated)) for slot in self.slots]

    def cancel_all(self) -> None:
        with self._wake:
            requests = [*self._waiting, *(s.request for s in self.slots if s.request is not None)]
        for request in requests:
            request.stop.set()
        with self._wake:
            self._wake.notify()

    @contextlib.contextmanager
    def idle_slot(self, seq: int) -> Iterator[Slot | None]:
        """The slot `seq` while no step runs, so that its KV cells may be saved or replaced; None when
        it is generating (then nothing may touch it). The block must keep `cache` and `generated` true
        to what the cells hold."""
        with self._step_lock:
            slot = self.slots[seq]
            yield slot if slot.request is None else None

    def reset(self) -> None:
        """Empty the caches of the slots that are not generating."""
        with self._step_lock:
            for slot in self.slots:
                if slot.request is None:
                    self.backend._slot_truncate(slot.seq, 0)
                    slot.cache, slot.generated = [], []

    def close(self) -> bool:
        """Stop every request and the worker; False if the worker is still mid-step (the model must then
        stay allocated: freeing it under a running decode would crash)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self.cancel_all()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        if sys.is_finalizing():  # at interpreter exit a daemon thread can no longer run: joining would only wait
            return False
        thread.join(timeout=60)
        return not thread.is_alive()

    def _start(self) -> None:
        if self._thread is None:
            previous = threading.stack_size(WORKER_STACK_BYTES)
            try:
                self._thread = threading.Thread(target=self._work, name="yi-local-generate", daemon=True)
                self._thread.start()
            finally:
                threading.stack_size(previous)

    # -- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active():
                    self._wake.wait()
                if self._closed and not self._active() and not self._waiting:
                    return
            with self._step_lock:
                try:
                    self._step()
                except BaseException as e:  # a bug: fail what is running, never kill the worker
                    logger.exception("generation step failed")
                    for slot in self.slots:
                        if slot.request is not None:
                            self._fail(slot, e)

    def _active(self) -> list[Request]:
        return [slot.request for slot in self.slots if slot.request is not None]

    def _step(self) -> None:
        for slot in self.slots:
            request = slot.request
            if request is not None and (request.cancelled or self._closed):
                self._end(slot, request.reply.end("cancelled"))
        self._admit()
        batch, rows = self._batch()
        if not batch:
            return
        if self.on_step is not None:
            self.on_step(batch)
        try:
            self.backend._decode(batch)
        except YiLocalError as e:  # e.g. the GPU's memory is full
            # A prompt chunk (many tokens; the batch's last chunk) is the likely culprit: its request
            # fails, and the generating sequences' tokens are tried again without it.
            last = self.slots[batch[-1].seq].request
            if len(batch) == 1 or last is None or not last.todo:
                self._fail_all(batch, e)
                return
            self._fail(self.slots[batch[-1].seq], e)
            batch, rows = batch[:-1], [(r, row) for r, row in rows if r is not last]
            try:
                self.backend._decode(batch)
            except YiLocalError as e2:
                self._fail_all(batch, e2)
                return
        for chunk in batch:
            slot = self.slots[chunk.seq]
            request = slot.request
            assert request is not None
            reading = bool(request.todo)
            slot.cache.extend(chunk.tokens)
            slot.generated.extend([not reading] * len(chunk.tokens))
            if reading:
                request.todo = request.todo[len(chunk.tokens) :]
                if not request.todo:
                    request.reply.prompt_done()
        for request, row in rows:
            self._sample(request, row)

    def _admit(self) -> None:
        while True:
            with self._wake:
                self._drop_cancelled()
                idle = [slot for slot in self.slots if slot.request is None]
                if not idle or not self._waiting or self._closed:
                    return
                request = self._waiting.popleft()
            slot = _choose(idle, request.prompt)
            try:
                self._begin(slot, request)
            except BaseException as e:
                if slot.request is request:
                    self._fail(slot, e)
                else:  # failed before taking the slot, whose cache may be half cut: empty it
                    slot.cache, slot.generated = [], []
                    _emit(request, e)

    def _begin(self, slot: Slot, request: Request) -> None:
        prompt = request.prompt
        keep = min(_common(slot.cache, prompt), len(prompt) - 1)  # the last one is evaluated for its logits
        keep = self.backend._slot_truncate(slot.seq, keep)
        slot.cache, slot.generated = slot.cache[:keep], slot.generated[:keep]
        slot.request, request.slot = request, slot
        request.todo = prompt[keep:]
        request.reply.started(keep)
        self.backend._begin_sampling(slot.seq, request.params, prompt)

    def _batch(self) -> tuple[list[Chunk], list[tuple[Request, int]]]:
        """This step's chunks, and the batch row each sequence that wants a token samples at."""
        batch: list[Chunk] = []
        rows: list[tuple[Request, int]] = []
        n = 0
        reading: list[Slot] = []
        for slot in self.slots:
            request = slot.request
            if request is None:
                continue
            if request.todo:
                reading.append(slot)
            elif request.next_token is not None:
                if len(slot.cache) >= self.n_ctx:  # never past the sequence's own context
                    self._end(slot, request.reply.end("length"))
                    continue
                batch.append(Chunk(slot.seq, [request.next_token], len(slot.cache), True))
                rows.append((request, n))
                n += 1
        if reading and n < self.n_batch:
            slot = min(reading, key=lambda s: s.request.reply.t_start)  # type: ignore[union-attr]
            request = slot.request
            assert request is not None
            take = request.todo[: self.n_batch - n]
            last = len(take) == len(request.todo)
            batch.append(Chunk(slot.seq, take, len(slot.cache), last))
            if last:
                rows.append((request, n + len(take) - 1))
        return batch, rows

    def _sample(self, request: Request, row: int) -> None:
        slot = request.slot
        assert slot is not None
        reply = request.reply
        if not reply.wants_more:  # max_tokens 0 from a caller that skipped SamplingParams.validate
            self._end(slot, reply.end("length"))
            return
        try:
            token = self.backend._sample(slot.seq, row)
        except BaseException as e:
            self._fail(slot, e)
            return
        events, done = reply.push(token)
        for event in events:
            _emit(request, event)
        if done:
            self._release(slot)
            _emit(request, None)
        else:
            request.next_token = token

    def _end(self, slot: Slot, events: list[Event]) -> None:
        request = slot.request
        assert request is not None
        self._release(slot)
        for event in events:
            _emit(request, event)
        _emit(request, None)

    def _fail_all(self, batch: list[Chunk], error: BaseException) -> None:
        for chunk in batch:
            self._fail(self.slots[chunk.seq], error)

    def _fail(self, slot: Slot, error: BaseException) -> None:
        request = slot.request
        if request is None:
            return
        # What the slot's cache holds is unknown after a failure: empty it.
        try:
            self.backend._slot_truncate(slot.seq, 0)
        except BaseException:
            logger.exception("clearing slot %d failed", slot.seq)
        slot.cache, slot.generated = [], []
        self._release(slot)
        _emit(request, error)

    def _release(self, slot: Slot) -> None:
        request = slot.request
        if request is not None:
            request.slot = None
        slot.request = None
        slot.idle_since = time.monotonic()
        try:
            self.backend._end_sampling(slot.seq)
        except BaseException:
            logger.exception("freeing slot %d's sampler failed", slot.seq)


def _emit(request: Request, item: Event | BaseException | None) -> None:
    """Hand an item to the request's reader; a reader that cannot take it (its event loop closed) is
    gone: its request stops, and the engine and the other requests go on."""
    try:
        request.sink(item)
    except BaseException:
        logger.exception("a reader could not take its events; its request stops")
        request.stop.set()


def _choose(idle: list[Slot], prompt: list[int]) -> Slot:
    """The slot for a prompt: the one holding most of it when the prompt continues what that slot holds
    (a returning conversation: at least half of the slot's cache is its prefix) or is all in it (asked
    again), else an empty slot, else the one idle longest. A shared system prompt alone does not take a
    slot from its conversation."""
    common, best = max(((_common(s.cache, prompt), s) for s in idle), key=lambda x: (x[0], -x[1].idle_since))
    if best.cache and (2 * common >= len(best.cache) or common == len(prompt)):
        return best
    return next((s for s in idle if not s.cache), None) or min(idle, key=lambda s: s.idle_since)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
