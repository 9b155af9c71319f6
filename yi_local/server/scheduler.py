"""One worker thread owns the model; requests wait in a fair FIFO queue and stream events back.

Each job carries a cancel event: a client that disconnects sets it and the worker stops that job at
the next token, or skips it if it has not started. The queue is the seam where continuous batching
will go: the worker may later take several jobs at once without changing `submit`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

from yi_local.errors import YiLocalError
from yi_local.runtime import Event, Finish, SamplingParams, Timings, Usage
from yi_local.runtime.backend import Backend

WORKER_STACK_BYTES = 64 << 20


class QueueFullError(YiLocalError):
    pass


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def push(self, item: Event | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def stream(self) -> AsyncIterator[Event]:
        """The job's events; cancels the job if the consumer stops early (a client disconnect)."""
        try:
            while True:
                item = await self.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel.set()


class Scheduler:
    def __init__(self, backend: Backend, max_queue: int = 64):
        self.backend = backend
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False  # a job is generating right now
        self._current: Job | None = None
        # llama.cpp walks grammars recursively on this thread: give it room beyond the 8 MB default.
        previous = threading.stack_size(WORKER_STACK_BYTES)
        try:
            self._thread = threading.Thread(target=self._work, name="yi-local-generate", daemon=True)
            self._thread.start()
        finally:
            threading.stack_size(previous)

    def submit(self, prompt: list[int], params: SamplingParams) -> Job:
        job = Job(prompt, params, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError("the server is busy: too many requests are waiting", hint="retry shortly") from None
        return job

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def cancel_all(self) -> None:
        """Stop the running job at its next token and every queued one (the server is shutting down)."""
        with self._jobs.mutex:
            waiting = [job for job in self._jobs.queue if job is not None]
        for job in [*waiting, self._current]:
            if job is not None:
                job.cancel.set()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                job.push(Finish("cancelled", Usage(len(job.prompt), 0), Timings(0, 0.0, 0, 0.0, 0.0)))
                job.push(None)
                continue
            self.busy, self._current = True, job
            try:
                for event in self.backend.generate(job.prompt, job.params, job.cancel):
                    job.push(event)
            except BaseException as e:  # delivered to the request, never kills the worker
                job.push(e)
            finally:
                self.busy, self._current = False, None
            job.push(None)
