"""The handoff from the model's thread to the UI's loop: nothing lost, in order, one wake-up per batch,
the last item taken at once, and a producer that never waits."""

from __future__ import annotations

import asyncio
import threading
import time

from tui.handoff import Handoff


async def test_items_from_a_thread_arrive_in_order_in_few_batches():
    handoff: Handoff[int] = Handoff()
    wakeups = []
    wake = handoff._wake
    handoff._wake = lambda last: (wakeups.append(last), wake(last))[1]
    put_times = []

    def produce():
        for i in range(10_000):
            start = time.perf_counter()
            handoff.put(i, last=i == 9_999)
            put_times.append(time.perf_counter() - start)

    threading.Thread(target=produce).start()
    got, batches = [], 0
    while not got or got[-1] != 9_999:
        got += await handoff.take(gap=0.02)
        batches += 1
    assert got == list(range(10_000))
    assert len(wakeups) <= 2 * batches + 1 < 200  # one wake-up per take, not one per item
    assert max(put_times) < 0.05  # the producer never waited for the loop


async def test_the_last_item_is_taken_at_once_despite_a_long_gap():
    handoff: Handoff[str] = Handoff()
    await asyncio.sleep(0)
    threading.Timer(0.05, lambda: (handoff.put("a"), handoff.put("end", last=True))).start()
    start = time.monotonic()
    assert await handoff.take(gap=30) == ["a", "end"]
    assert time.monotonic() - start < 5


async def test_the_first_take_gathers_for_a_gap():
    handoff: Handoff[int] = Handoff()
    handoff.put(1)
    threading.Timer(0.05, handoff.put, (2,)).start()
    assert await handoff.take(gap=0.3) == [1, 2]


async def test_a_late_wake_up_never_returns_an_empty_batch():
    handoff: Handoff[int] = Handoff()
    handoff.put(1)
    await asyncio.sleep(0)  # the wake-up ran
    assert await handoff.take() == [1]
    handoff._wake(True)  # a wake-up whose item was taken already
    threading.Timer(0.05, handoff.put, (2,)).start()
    assert await asyncio.wait_for(handoff.take(), 5) == [2]
