"""How often the chat paints a reply that is being written, so that the screen never slows the model.

With a core to spare (a GPU runs the model, or llama.cpp's threads leave a core free), painting costs
the model nothing: frames come every `FRAME_S`. When the model's threads keep every core busy, each
millisecond the UI takes is one a llama.cpp thread waits (its threads meet at a barrier after every
layer), so frames are spaced for the UI to take `BUSY_SHARE` of a core, at most `MAX_FRAME_S` apart; the
text gathers in between and the last frame, when the reply ends, comes at once. Textual paints a full
120x40 screen in 15-60 ms of a slow CPU (more as the conversation grows), so on a 2-core machine running
the model on both cores that is a frame every 1-2 s. Measured there at turn 5 of a chat, the UI thread
took 2.4% of a core with a 2% share (the message's and the last paint's cost besides) and the model
decoded at 0.96x of `run`; a millisecond of UI costs the model more than a millisecond (both of its
threads wait at the barrier), hence 1%.
"""

from __future__ import annotations

import time

from yi_local.hardware import cpu_count

FRAME_S = 1 / 20
MAX_FRAME_S = 2.0
BUSY_SHARE = 0.01
SPARE_CORE = 0.75  # the process leaves at least this much of a core idle: painting is free


class FramePacer:
    """Call `gap()` on the UI thread after each frame: the time to wait before the next one."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or cpu_count()
        self._last = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        """(wall clock, this process's CPU on every thread, this thread's CPU)."""
        return time.monotonic(), time.process_time(), time.thread_time()

    def first_gap(self, paint_cpu: float, model_on_cpu: bool) -> float:
        """The wait before a reply's first frame, before anything is measured: a frame is taken to cost
        what `paint_cpu` (the UI thread's CPU for the last paint) did, and a model on the CPU to keep
        every core busy. Starts the first interval."""
        self._last = self._now()
        return frame_gap(paint_cpu, self.cores if model_on_cpu else 0.0, 1.0, self.cores)

    def gap(self) -> float:
        now = self._now()
        (wall, process, ui), (wall0, process0, ui0) = now, self._last
        self._last = now
        return frame_gap(ui - ui0, process - process0, wall - wall0, self.cores)


def frame_gap(ui_cpu: float, process_cpu: float, wall: float, cores: int) -> float:
    """The wait before the next frame, from the last frame's interval: the UI thread's CPU in it (the
    frame's layout and paint), the whole process's CPU (the model's threads too) and the wall time."""
    if wall <= 0:
        return FRAME_S
    idle_cores = cores - process_cpu / wall
    if idle_cores >= SPARE_CORE:
        return FRAME_S
    return min(max(FRAME_S, ui_cpu / BUSY_SHARE), MAX_FRAME_S)
