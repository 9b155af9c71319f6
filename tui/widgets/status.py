"""One line: model and quantization, backend and offload, context used, speed of the last reply."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    model = reactive("")
    offload = reactive("")
    context = reactive("")
    speed = reactive("")
    state = reactive("")

    def render(self) -> str:
        parts = [self.model, self.offload, self.context, self.speed, self.state]
        return " · ".join(p for p in parts if p)
