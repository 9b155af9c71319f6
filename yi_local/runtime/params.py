"""What a caller may ask of loading and of sampling, as plain dataclasses, and the one table of their limits.

The limits are written once, here: the runtime refuses values outside them before llama.cpp sees
them (llama.cpp aborts the process on some, e.g. a negative batch or 100,000 threads), the CLI
derives its argument checks from them, and the server turns a violation into a 400 naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

from yi_local.errors import YiLocalError
from yi_local.kv_types import DEFAULT_KV_TYPE, check_kv

# ggml's thread pool holds at most GGML_MAX_N_THREADS (512) threads; more crashes llama.cpp.
MAX_THREADS = 512
MAX_CTX = 1 << 24
MIN_CTX = 64  # llama.cpp pads smaller contexts to 256 anyway


@dataclass(frozen=True)
class Limit:
    """A closed range [low, high], or half-open at the low end with `low_open`."""

    low: float
    high: float
    low_open: bool = False
    integer: bool = False
    note: str = ""

    def describe(self) -> str:
        def show(v: float) -> str:
            return f"{int(v)}" if self.integer else f"{v:g}"

        low = f"above {show(self.low)}" if self.low_open else f"at least {show(self.low)}"
        kind = "an integer" if self.integer else "a number"
        text = f"{kind} {low} and at most {show(self.high)}"
        return f"{text} ({self.note})" if self.note else text

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


SAMPLING_LIMITS: dict[str, Limit] = {
    "max_tokens": Limit(1, 2**31 - 1, integer=True),
    "temperature": Limit(0.0, 2.0, note="0 is greedy"),
    "top_k": Limit(0, 1 << 20, integer=True, note="0 is off"),
    "top_p": Limit(0.0, 1.0, low_open=True, note="1 is off"),
    "min_p": Limit(0.0, 1.0, note="0 is off"),
    "repeat_penalty": Limit(0.0, 10.0, low_open=True, note="1 is off"),
    "repeat_last_n": Limit(0, 1 << 20, integer=True, note="how many recent tokens the penalties look at; 0 is off"),
    "frequency_penalty": Limit(-2.0, 2.0, note="0 is off"),
    "presence_penalty": Limit(-2.0, 2.0, note="0 is off"),
    "seed": Limit(-(2**63), 2**64 - 1, integer=True),
}

LOAD_LIMITS: dict[str, Limit] = {
    "n_ctx": Limit(0, MAX_CTX, integer=True, note=f"0 is the model's own; otherwise at least {MIN_CTX}"),
    "n_batch": Limit(1, 1 << 16, integer=True),
    "n_threads": Limit(1, MAX_THREADS, integer=True),
    "n_gpu_layers": Limit(-1, 1 << 16, integer=True, note="-1 is all"),
    "n_parallel": Limit(1, 256, integer=True),  # llama.cpp's LLAMA_MAX_SEQ
}

LOGIT_BIAS_LIMIT = Limit(-100.0, 100.0)
CHAT_MAX_TOKENS = 1024  # the chat's default reply length: longer than `run`'s
MAX_STOPS, MAX_STOP_CHARS, MAX_LOGIT_BIAS = 16, 512, 1024


class ParamError(YiLocalError):
    """A value out of range; `name` is the field (snake_case) it belongs to."""

    def __init__(self, name: str, message: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.name = name


def check(name: str, value, limits: dict[str, Limit]) -> None:
    limit = limits[name]
    if not limit.contains(value):
        raise ParamError(name, f"{name} must be {limit.describe()}, not {value!r}")


@dataclass
class LoadOptions:
    n_gpu_layers: int | str = "auto"  # "auto", or a number of layers (-1: all)
    n_ctx: int = 4096  # 0: the model's training context
    n_threads: int | None = None  # None: all cores
    n_batch: int = 512
    n_parallel: int = 1  # sequences decoded together in one context; n_ctx is per sequence
    kv_type: str = DEFAULT_KV_TYPE  # keys and values: f16, bf16, q8_0, q4_0 (yi_local.kv_types)
    flash_attn: str = "auto"  # auto: llama.cpp's choice for the device (always on for a quantized cache); on; off
    memory_budget: int | None = None  # bytes `n_ctx=0` may plan for (None: what is free here)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers, "host:port": their devices join this machine's
    on_progress: Callable[[float], None] | None = None  # 0..1 while the weights load

    def validate(self) -> None:
        if self.n_gpu_layers != "auto":
            check("n_gpu_layers", self.n_gpu_layers, LOAD_LIMITS)
        check("n_ctx", self.n_ctx, LOAD_LIMITS)
        if 0 < self.n_ctx < MIN_CTX:
            raise ParamError("n_ctx", f"a context of {self.n_ctx} tokens is too small: use at least {MIN_CTX}, "
                             "or 0 for the model's own")  # fmt: skip
        if self.n_threads is not None:
            check("n_threads", self.n_threads, LOAD_LIMITS)
        check("n_batch", self.n_batch, LOAD_LIMITS)
        check("n_parallel", self.n_parallel, LOAD_LIMITS)
        if self.n_parallel > self.n_batch:
            raise ParamError("n_parallel", f"{self.n_parallel} parallel sequences need a batch of at least as many "
                             f"tokens, not {self.n_batch}")  # fmt: skip
        check_kv(self.kv_type, self.flash_attn)
        if self.rpc:
            from yi_local.rpc import parse_endpoints

            parse_endpoints(",".join(self.rpc))


PARALLEL_GPU, PARALLEL_CPU = 4, 2


def auto_parallel(gpu: str | None, n_gpu_layers: int | str, backend: str = "llama.cpp") -> int:
    """`serve --parallel auto`: 4 sequences on a GPU, whose chip one sequence leaves mostly idle; 2 on
    the CPU, where batching gains less and every extra sequence slows the others; 1 for transformers."""
    if backend != "llama.cpp":
        return 1
    return PARALLEL_GPU if gpu is not None and n_gpu_layers != 0 else PARALLEL_CPU


@dataclass
class SamplingParams:
    max_tokens: int | None = 512  # None: until the context is full
    temperature: float = 0.7  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF

    @property
    def penalized(self) -> bool:
        """Whether any of the repetition penalties is on."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )

    @property
    def seed32(self) -> int | None:
        """The seed as llama.cpp takes it: 32 bits, never 0xFFFFFFFF (which means "random" there)."""
        return None if self.seed is None else self.seed % 0xFFFFFFFF

    def validate(self) -> None:
        """Raise ParamError naming the first field out of range (backend-independent checks only)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SAMPLING_LIMITS and value is not None:
                check(f.name, value, SAMPLING_LIMITS)
        if len(self.stop) > MAX_STOPS or any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ParamError("stop", f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ParamError("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias.items():
            if not LOGIT_BIAS_LIMIT.contains(bias):
                raise ParamError("logit_bias", f"logit_bias values must be between -100 and 100, not {bias!r} "
                                 f"(token {token})")  # fmt: skip
