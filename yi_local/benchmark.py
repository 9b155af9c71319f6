"""Prompt and generation speed of yi-local's engine next to a bare llama-cpp-python loop, in the same run.

For each parallel level N both sides load the same GGUF with the same context (per sequence), threads,
batch and GPU layers, evaluate the same N different prompts of p random tokens, and generate n tokens for
each, greedily, with every end-of-generation token forbidden so that every sequence runs to n:
  - yi-local: N threads call `Backend.generate` at once, on a backend loaded with n_parallel=N (the loop
    `run`, `chat` and `serve` use: events, stop handling, UTF-8 decoding);
  - bare: llama-cpp-python's low-level API in a plain loop: one context holding N sequences, batches whose
    tokens carry their sequence's id, a native sampler chain (logit bias + greedy) per sequence. For N = 1
    it does exactly what a plain single-sequence loop does.
The prompt phase ends when a sequence has its first token (sampled from the prompt's logits); the
generation phase covers the n - 1 tokens after it, each one evaluation and one sample. Speeds are
aggregate: all sequences' tokens over the time during which some sequence was in that phase.

Nothing here prints: `yi-local bench` and bench/decode.py do.
"""

from __future__ import annotations

import platform
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from yi_local import __version__, hardware
from yi_local.errors import YiLocalError
from yi_local.fit import kv_cache_bytes
from yi_local.gguf_header import check_model, model_meta
from yi_local.kv_types import DEFAULT_KV_TYPE, FLASH_ATTN_IDS, KV_TYPES, check_kv
from yi_local.llama_lib import llama_cpp, load_model
from yi_local.runtime import Finish, LoadOptions, SamplingParams, TextDelta, load_backend
from yi_local.runtime.offload import own_context, plan_offload
from yi_local.units import format_size

MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ
MIN_GEN = 2  # the first token comes from the prompt's evaluation; generation is timed from it on
BAN = -100.0  # the API's lowest logit bias: enough to forbid a token


@dataclass(frozen=True)
class Speed:
    """One side's measurement at one parallel level; tokens of all sequences together."""

    prompt_tokens: int
    prompt_s: float
    generated_tokens: int  # after each sequence's first token
    generate_s: float
    prompt_tps: float
    generate_tps: float
    generate_tps_per_sequence: float

    @classmethod
    def of(cls, n_parallel: int, prompt_tokens: int, prompt_s: float, generated_tokens: int, generate_s: float):
        prompt_tps = prompt_tokens / prompt_s if prompt_s > 0 else 0.0
        generate_tps = generated_tokens / generate_s if generate_s > 0 else 0.0
        return cls(prompt_tokens, prompt_s, generated_tokens, generate_s, prompt_tps, generate_tps,
                   generate_tps / n_parallel)  # fmt: skip


@dataclass(frozen=True)
class Level:
    n_parallel: int
    yi_local: Speed
    bare: Speed
    prompt_ratio: float  # yi-local / bare
    generate_ratio: float


@dataclass(frozen=True)
class Setup:
    """What is measured, settled before anything runs."""

    model: str
    name: str
    quantization: str
    size_bytes: int
    n_params: int
    n_prompt: int
    n_gen: int
    n_ctx: int  # per sequence
    n_threads: int
    n_batch: int
    n_gpu_layers: int  # -1: all
    offload: str  # "CPU", "Metal", "CUDA 33/33 layers"
    parallel: list[int]
    kv_type: str = DEFAULT_KV_TYPE
    flash_attn: str = "auto"
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers holding layers, on both sides
    ctx_note: str = ""  # how --ctx 0 was settled ("" when --ctx was given)


@dataclass(frozen=True)
class Environment:
    """What a bug report needs to know about where the numbers came from."""

    yi_local_version: str
    llama_cpp_python_version: str
    python_version: str
    os: str
    cpu: str
    cores: int
    ram: str
    gpu_offload: bool  # llama.cpp has a GPU here (an RPC build "supports offload" to workers even without one)
    build: str  # "CPU", "CUDA", "Metal", ...
    devices: list[str] = field(default_factory=list)  # ggml's devices, e.g. "CUDA0: NVIDIA H100 80GB HBM3"
    system_info: str = ""  # llama_print_system_info()


def environment() -> Environment:
    from importlib.metadata import PackageNotFoundError, version

    L = llama_cpp()
    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        llama_version = getattr(L, "__version__", "unknown")
    summary = hardware.system_summary()
    return Environment(
        yi_local_version=__version__, llama_cpp_python_version=llama_version,
        python_version=platform.python_version(), os=summary["os"], cpu=summary["cpu"],
        cores=int(summary["cores"]), ram=summary["ram"], gpu_offload=hardware.llama_gpu_kind() is not None,
        build=hardware.llama_gpu_kind() or "CPU", devices=hardware.llama_devices(),
        system_info=L.llama_print_system_info().decode(errors="replace").strip(),
    )  # fmt: skip


def parse_parallel(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4] (repeats dropped, order kept); ValueError with the reason otherwise."""
    levels: list[int] = []
    for word in text.split(","):
        word = word.strip()
        try:
            n = int(word)
        except ValueError:
            raise ValueError(f"expected a comma-separated list of whole numbers such as 1,2,4, not {text!r}") from None
        if not 1 <= n <= MAX_PARALLEL:
            raise ValueError(f"each level must be at least 1 and at most {MAX_PARALLEL} (llama.cpp's limit of "
                             f"sequences), not {n}")  # fmt: skip
        if n not in levels:
            levels.append(n)
    return levels


def check_fit(n_prompt: int, n_gen: int, n_ctx: int, why: str = "") -> None:
    """A sequence's prompt and reply must fit its context (llama.cpp's own batch of a context is p + n)."""
    if n_prompt + n_gen > n_ctx:
        raise YiLocalError(
            f"a prompt of {n_prompt} tokens and {n_gen} generated tokens ({n_prompt + n_gen}) do not fit a context "
            f"of {n_ctx} tokens per sequence{why}",
            hint=f"raise --ctx to at least {n_prompt + n_gen}, or lower -p / -n",
        )


def prompts_for(
    vocab_ok: Callable[[int], bool], n_vocab: int, n_seqs: int, n_tokens: int, seed: int = 0
) -> list[list[int]]:
    """`n_seqs` different prompts of `n_tokens` random ordinary tokens: real ids, and no shared prefix for
    a KV cache to reuse. The same for a given seed, so every run measures the same work."""
    usable = [t for t in range(n_vocab) if vocab_ok(t)]
    if not usable:
        raise YiLocalError("the model's vocabulary has no ordinary tokens to build prompts from")
    rng = random.Random(seed)
    return [[rng.choice(usable) for _ in range(n_tokens)] for _ in range(n_seqs)]


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds inside at least one of `spans`."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class BareLoop:
    """The baseline: llama-cpp-python's low-level API, decode and native samplers in a plain loop."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, vocab_only: bool = False, rpc: tuple[str, ...] = ()):
        L = self._L = llama_cpp()
        self._devices = None
        if rpc:  # the same workers as yi-local's side (this process aborts if one dies: it is a benchmark)
            from yi_local import rpc as rpc_

            workers = rpc_.probe_all([e for text in rpc for e in rpc_.parse_endpoints(text)])
            self._devices = rpc_.device_array(workers, with_local_gpus=hardware.llama_gpu_kind() is not None)
        self._model = load_model(path, n_gpu_layers, vocab_only, self._devices)
        self.vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.generated: list[list[int]] = []  # the last run's tokens, per sequence

    def end_tokens(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self._L.llama_vocab_is_eog(self.vocab, t)]

    def ordinary(self, token: int) -> bool:
        """A plain text piece: not control, byte, unknown or unused, and not an end of generation."""
        L = self._L
        return bool(L.llama_vocab_get_attr(self.vocab, token) & L.LLAMA_TOKEN_ATTR_NORMAL) and not L.llama_vocab_is_eog(
            self.vocab, token
        )

    def close(self) -> None:
        if self._model:
            self._L.llama_model_free(self._model)
            self._model = None

    def run(self, prompts: list[list[int]], n_gen: int, n_ctx: int, n_threads: int, n_batch: int,
            logit_bias: dict[int, float], kv_type: str = DEFAULT_KV_TYPE, flash_attn: str = "auto") -> Speed:  # fmt: skip
        """Evaluate `prompts` (one sequence each) and generate `n_gen` tokens for each."""
        L, n_seqs = self._L, len(prompts)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx * n_seqs, n_seqs, True
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type].ggml_type
        cp.flash_attn_type = FLASH_ATTN_IDS[flash_attn]
        ctx = L.llama_init_from_model(self._model, cp)
        if not ctx:
            raise YiLocalError(f"llama.cpp could not create a context of {n_ctx * n_seqs} tokens for {n_seqs} "
                               "sequences", hint="try a smaller --ctx or fewer --parallel sequences")  # fmt: skip
        chunk = L.llama_n_batch(ctx)  # llama.cpp clamps the batch to the context
        batches, chains = [], []
        try:
            bias = (L.llama_logit_bias * len(logit_bias))(
                *[L.llama_logit_bias(token=t, bias=b) for t, b in logit_bias.items()]
            )
            for _ in range(n_seqs):
                chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
                chains.append(chain)
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, len(logit_bias), bias))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())

            def batch(items: list[tuple[int, int, int, bool]]):
                """A batch filled before the clock starts; (its batch, the sequences whose logits it has, by index)."""
                b = L.llama_batch_init(chunk, 0, 1)
                batches.append(b)
                for i, (token, pos, seq, logits) in enumerate(items):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
                b.n_tokens = len(items)
                return b, [(i, seq) for i, (_, _, seq, logits) in enumerate(items) if logits]

            def chunks(items: list) -> list:
                return [batch(items[i : i + chunk]) for i in range(0, len(items), chunk)]

            prompt_batches = chunks(
                [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
            )
            step_batches = chunks([(0, 0, s, True) for s in range(n_seqs)])
            self._warm_up(ctx, prompts[0][0])
            out: list[list[int]] = [[] for _ in prompts]

            def decode(b, outputs) -> None:
                if L.llama_decode(ctx, b) != 0:
                    raise YiLocalError(f"llama.cpp failed to evaluate a batch of {b.n_tokens} tokens",
                                       hint="try a smaller --ctx, -p or --parallel")  # fmt: skip
                for i, seq in outputs:
                    out[seq].append(L.llama_sampler_sample(chains[seq], ctx, i))

            t0 = time.perf_counter()
            for b, outputs in prompt_batches:
                decode(b, outputs)
            t1 = time.perf_counter()
            for step in range(n_gen - 1):
                for b, outputs in step_batches:
                    for i, seq in outputs:
                        b.token[i], b.pos[i] = out[seq][-1], len(prompts[seq]) + step
                    decode(b, outputs)
            t2 = time.perf_counter()
            self.generated = out
        finally:
            for b in batches:
                L.llama_batch_free(b)
            for chain in chains:
                L.llama_sampler_free(chain)
            L.llama_free(ctx)
        return Speed.of(n_seqs, sum(map(len, prompts)), t1 - t0, n_seqs * (n_gen - 1), t2 - t1)

    def _warm_up(self, ctx, token: int) -> None:
        """One token through every layer, so that neither side pays for reading the weights in."""
        L = self._L
        one = (L.llama_token * 1)(token)
        L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
        L.llama_memory_clear(L.llama_get_memory(ctx), True)


def engine_run(backend, prompts: list[list[int]], n_gen: int, logit_bias: dict[int, float]) -> Speed:
    """yi-local's side: one thread per prompt, all calling `backend.generate` at once."""
    n_seqs = len(prompts)
    warm = backend.generate(prompts[0][:1], SamplingParams(temperature=0, max_tokens=1))
    for _ in warm:
        pass
    backend.reset()
    params = SamplingParams(temperature=0, max_tokens=n_gen, logit_bias=logit_bias)
    start = threading.Barrier(n_seqs)
    cancel = threading.Event()
    seen: list[dict] = [{} for _ in prompts]

    def one(i: int) -> None:
        try:
            start.wait()
            seen[i]["call"] = time.perf_counter()
            for event in backend.generate(prompts[i], params, cancel):
                if isinstance(event, TextDelta) and event.token_ids and "first" not in seen[i]:
                    seen[i]["first"] = time.perf_counter()
                elif isinstance(event, Finish):
                    seen[i]["end"], seen[i]["finish"] = time.perf_counter(), event
        except BaseException as e:  # handed to the caller's thread
            seen[i]["error"] = e
            cancel.set()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n_seqs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:  # Ctrl+C: the generations stop at their next step, before the backend is closed under them
        cancel.set()
        start.abort()  # threads not yet released go home (harmless once all are)
        for t in threads:
            if t.is_alive():
                t.join()
    for s in seen:
        if "error" in s:
            raise s["error"]
    prompt_spans, generate_spans, prompt_tokens = [], [], 0
    for s in seen:
        finish: Finish | None = s.get("finish")
        if finish is None or finish.usage.completion_tokens != n_gen or "first" not in s:
            got = f"{finish.usage.completion_tokens} of {n_gen} tokens ({finish.reason})" if finish else "no end"
            raise YiLocalError(f"yi-local's engine generated {got}", hint="a bug: report it with this command's output")
        # A call may wait for the engine (one that decodes fewer sequences at once): its work starts when
        # its own clock does.
        t = finish.timings
        began = max(s["call"], s["end"] - (t.prompt_s + t.generate_s))
        prompt_spans.append((began, s["first"]))
        generate_spans.append((s["first"], s["end"]))
        prompt_tokens += t.evaluated_tokens
    backend.reset()
    return Speed.of(n_seqs, prompt_tokens, _covered(prompt_spans), n_seqs * (n_gen - 1), _covered(generate_spans))


class Bench:
    """Settles the setup (model header, context, offload, prompts), then measures one level at a time."""

    def __init__(self, path: str | Path, n_prompt: int, n_gen: int, parallel: list[int], n_ctx: int,
                 n_threads: int | None, n_batch: int, n_gpu_layers: int | str, seed: int = 0,
                 kv_type: str = DEFAULT_KV_TYPE, flash_attn: str = "auto", rpc: tuple[str, ...] = (),
                 memory_budget: int | None = None):  # fmt: skip
        """`memory_budget`: the free bytes `n_ctx=0` may plan for (None: what is free here, as `run`)."""
        if n_gen < MIN_GEN:
            raise YiLocalError(f"-n is {n_gen}; it must be at least {MIN_GEN}",
                               hint="the first token comes with the prompt; generation is timed after it")  # fmt: skip
        meta = model_meta(check_model(path))  # a damaged file is named here, before llama.cpp sees it
        gpu = hardware.llama_gpu_kind()
        head_dim = meta.n_embd // max(1, meta.n_head)
        check_kv(kv_type, flash_attn, head_dim)
        gpu_free = hardware.gpu_free_bytes(gpu)
        kind, free, workers_free = gpu, gpu_free, 0
        if rpc:  # the workers' memory joins this machine's GPU's
            from yi_local import rpc as rpc_

            workers = rpc_.probe_all([e for text in rpc for e in rpc_.parse_endpoints(text)])
            workers_free = sum(w.free for w in workers)
            kind, free = gpu or "RPC", (free or 0) + workers_free
        ctx_note = ""
        if n_ctx == 0:  # the model's own context, or the most of it that fits, as `run --ctx 0` takes it
            n_ctx, shrunk = meta.context_length, None
            if meta.context_length > 0:
                per_token = kv_cache_bytes(meta.n_layers, 1, meta.n_head_kv, head_dim, kv_type) * max(parallel)
                n_ctx, shrunk = own_context(meta.context_length, per_token, meta.file_size, memory_budget, gpu, gpu_free,
                                            workers_free)  # fmt: skip
            ctx_note = "the model's own: --ctx 0" if shrunk is None else (
                f"--ctx 0: the most of the model's own {meta.context_length:,} that fits beside the weights in "
                f"{format_size(shrunk)} free at --parallel {max(parallel)}")  # fmt: skip
        check_fit(n_prompt, n_gen, n_ctx, f" ({ctx_note})" if ctx_note else "")
        # One offload plan for every level and both sides, made for the largest KV cache measured.
        kv = kv_cache_bytes(meta.n_layers, n_ctx * max(parallel), meta.n_head_kv, head_dim, kv_type)
        plan = plan_offload(n_gpu_layers, meta.file_size, meta.n_layers, kv, kind, free)
        self.setup = Setup(
            model=str(path), name=meta.name, quantization=meta.quantization, size_bytes=meta.file_size,
            n_params=meta.n_params, n_prompt=n_prompt, n_gen=n_gen, n_ctx=n_ctx,
            n_threads=n_threads or hardware.cpu_count(), n_batch=n_batch, n_gpu_layers=plan.n_gpu_layers,
            offload=plan.description, parallel=list(parallel), kv_type=kv_type, flash_attn=flash_attn, rpc=tuple(rpc),
            ctx_note=ctx_note,
        )  # fmt: skip
        vocab = BareLoop(path, vocab_only=True)
        try:
            self._no_end = {t: BAN for t in vocab.end_tokens()}
            self._prompts = prompts_for(vocab.ordinary, vocab.n_vocab, max(parallel), n_prompt, seed)
        finally:
            vocab.close()

    def yi_local(self, n_parallel: int) -> Speed:
        s = self.setup
        options = LoadOptions(n_gpu_layers=s.n_gpu_layers, n_ctx=s.n_ctx, n_threads=s.n_threads, n_batch=s.n_batch,
                              n_parallel=n_parallel, kv_type=s.kv_type, flash_attn=s.flash_attn, rpc=s.rpc)  # fmt: skip
        backend = load_backend(s.model, options)
        try:
            return engine_run(backend, self._prompts[:n_parallel], s.n_gen, self._no_end)
        finally:
            backend.close()

    def bare(self, n_parallel: int) -> Speed:
        s = self.setup
        loop = BareLoop(s.model, s.n_gpu_layers, rpc=s.rpc)
        try:
            return loop.run(self._prompts[:n_parallel], s.n_gen, s.n_ctx, s.n_threads, s.n_batch, self._no_end,
                            s.kv_type, s.flash_attn)  # fmt: skip
        finally:
            loop.close()

    def level(self, n_parallel: int) -> Level:
        """Both sides at one level, one after the other (never both loaded: a GPU may hold one copy only)."""
        ours, base = self.yi_local(n_parallel), self.bare(n_parallel)
        return Level(n_parallel, ours, base, _ratio(ours.prompt_tps, base.prompt_tps),
                     _ratio(ours.generate_tps, base.generate_tps))  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0
