"""What a caller may ask of loading and of sampling, as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class LoadOptions:
    n_gpu_layers: int | str = "auto"  # "auto", or a number of layers (-1: all)
    n_ctx: int = 4096  # 0: the model's training context
    n_threads: int | None = None  # None: all cores
    n_batch: int = 512
    on_progress: Callable[[float], None] | None = None  # 0..1 while the weights load


@dataclass
class SamplingParams:
    max_tokens: int | None = 512  # None: until the context is full
    temperature: float = 0.7  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF
