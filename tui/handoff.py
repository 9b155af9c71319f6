"""Items from a worker thread to the UI's event loop, without the worker ever waiting for the UI.

`put` appends under a lock held for a few instructions and wakes the loop only when it is not woken
already, so a model that writes thousands of tokens a second costs the UI one wake-up per frame, not one
per token. `take` (on the loop) returns everything that has come since the last take, at most once per
`gap` seconds (counted from the handoff's creation for the first) so that text gathers while the screen
draws; the last item (`put(..., last=True)`) is taken at once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self) -> None:
        """Made on the event loop that will `take`."""
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._woken = False  # a wake-up is on its way: later puts need not send another
        self._ready = asyncio.Event()
        self._last = asyncio.Event()
        self._taken_at = self._loop.time()  # the first take waits `gap` too: a fast reply may be done by then

    def put(self, item: T, last: bool = False) -> None:
        """From any thread; never waits for the loop. Dropped quietly once the loop has closed (app exit)."""
        with self._lock:
            self._items.append(item)
            if self._woken and not last:
                return
            self._woken = True
        try:
            self._loop.call_soon_threadsafe(self._wake, last)
        except RuntimeError:  # the event loop is closed: the app has gone, nobody will read this
            pass

    def _wake(self, last: bool) -> None:
        self._ready.set()
        if last:
            self._last.set()

    async def take(self, gap: float = 0.0) -> list[T]:
        """Every item put since the last take (at least one), in order; waits up to `gap` s after the last take."""
        while True:
            await self._ready.wait()
            wait = self._taken_at + gap - self._loop.time()
            if wait > 0 and not self._last.is_set():
                try:
                    await asyncio.wait_for(self._last.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self._ready.clear()
            with self._lock:
                items, self._items = self._items, []
                self._woken = False
            if items:  # a late wake-up may find its items taken already: wait for the next ones
                self._taken_at = self._loop.time()
                return items
