"""The server's side of the engine: each request becomes a job whose events reach the event loop.

The engine decodes up to `--parallel` requests together and queues the rest (bounded: past the bound a
request is refused with 503). Each job carries a cancel event: a client that disconnects sets it and
the engine frees the job's slot before its next step, or drops the job if it has not started.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

from yi_local.runtime import Event, SamplingParams
from yi_local.runtime.backend import Backend
from yi_local.runtime.engine import QueueFullError

__all__ = ["Job", "QueueFullError", "Scheduler"]


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
        self.engine = backend.engine
        self.engine.max_queue = max_queue

    def submit(self, prompt: list[int], params: SamplingParams) -> Job:
        """A job for the engine; QueueFullError when `max_queue` requests are waiting already."""
        job = Job(prompt, params, asyncio.get_running_loop())
        self.engine.submit(prompt, params, job.cancel, job.push)
        return job

    @property
    def slots(self) -> int:
        return len(self.engine.slots)

    @property
    def busy(self) -> int:
        """Slots generating now."""
        return self.engine.busy

    @property
    def queued(self) -> int:
        return self.engine.queued

    def cancel_all(self) -> None:
        """Stop every running and queued job (the server is shutting down)."""
        self.engine.cancel_all()

    def close(self) -> None:
        self.engine.close()
