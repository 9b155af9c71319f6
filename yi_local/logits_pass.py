"""One model's logits over a text, window by window, laid out as llama-perplexity lays them out.

The text is tokenized whole (BOS first when the vocabulary adds one) and cut into `n_chunk` windows
of `n_ctx` tokens; each window starts a fresh KV cache, its first token replaced by BOS when the
vocabulary adds one. Logits are asked for positions `n_ctx // 2` on, so every scored token has at least
half a window of context. `n_batch // n_ctx` windows share one `llama_decode` as separate sequences
(a batch of 2048 tokens, ubatches of 512, a KV cache split per sequence, as llama-perplexity's
defaults), which keeps the logits bit for bit those llama-perplexity computes.

See tools/perplexity/perplexity.cpp (`perplexity`, `kl_divergence`) in llama.cpp.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from yi_local import hardware
from yi_local.errors import YiLocalError
from yi_local.fit import kv_cache_bytes
from yi_local.gguf_header import ModelMeta
from yi_local.llama_lib import llama_cpp, load_model, tokenize
from yi_local.runtime.offload import plan_offload
from yi_local.runtime.params import MIN_CTX

N_BATCH = 2048  # llama-perplexity's default --batch-size: the tokens of one llama_decode
N_UBATCH = 512  # and its --ubatch-size


@dataclass(frozen=True)
class Windows:
    """The tokenized text and its windows; window c holds tokens[c * n_ctx : (c + 1) * n_ctx]."""

    tokens: np.ndarray  # int32, the whole text
    n_ctx: int
    n_chunk: int
    bos: int | None  # replaces each window's first token (None: the vocabulary adds no BOS)

    @property
    def first(self) -> int:
        """The first position whose logits are scored (they predict the token after it)."""
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.first

    def targets(self, chunk: int) -> np.ndarray:
        """The tokens the scored positions of window `chunk` predict."""
        start = chunk * self.n_ctx + self.first + 1
        return self.tokens[start : start + self.n_scored]


def text_tokens(path: str | os.PathLike[str], text: bytes) -> tuple[np.ndarray, int | None]:
    """`text` tokenized whole by the model at `path` (its vocabulary only), as llama.cpp's perplexity and
    imatrix tools tokenize it (BOS added, special tokens' texts left as text); and its BOS, None when
    the vocabulary adds none (Yi's)."""
    L = llama_cpp()
    model = load_model(path, vocab_only=True)
    try:
        vocab = L.llama_model_get_vocab(model)
        tokens = np.array(tokenize(vocab, text, add_special=True, parse_special=False), dtype=np.int32)
        bos = int(L.llama_vocab_bos(vocab)) if L.llama_vocab_get_add_bos(vocab) else None
    finally:
        L.llama_model_free(model)
    return tokens, bos


def make_windows(path: str | os.PathLike[str], text: bytes, n_ctx: int, max_chunks: int | None,
                 source: str) -> Windows:  # fmt: skip
    """`text` tokenized by the model at `path` (its vocabulary only) and cut into windows of `n_ctx`."""
    tokens, bos = text_tokens(path, text)
    if len(tokens) < 2 * n_ctx:
        fits = len(tokens) // 4 * 2  # the largest even context with two windows in the text
        smaller = f", or a smaller --ctx (at most {fits} for this text)" if fits >= MIN_CTX else ""
        raise YiLocalError(f"{source} is {len(tokens):,} tokens long; two windows of --ctx {n_ctx} need "
                           f"{2 * n_ctx:,}", hint=f"give a longer --text{smaller}")  # fmt: skip
    n_chunk = len(tokens) // n_ctx
    return Windows(tokens, n_ctx, min(n_chunk, max_chunks) if max_chunks else n_chunk, bos)


class LogitsPass:
    """One model loaded with a context for several windows at once; `run` yields their logits."""

    def __init__(self, meta: ModelMeta, n_ctx: int, n_threads: int | None = None, n_gpu_layers: int | str = "auto",
                 n_batch: int = N_BATCH, cb_eval=None):  # fmt: skip
        """`cb_eval`: a ggml_backend_sched_eval_callback to see the graph's tensors (the importance matrix)."""
        L = self._L = llama_cpp()
        self.n_ctx = n_ctx
        self.n_seq = max(1, n_batch // n_ctx)
        n_batch = min(n_batch, self.n_seq * n_ctx)
        gpu = hardware.llama_gpu_kind()
        kv = kv_cache_bytes(meta.n_layers, self.n_seq * n_ctx, meta.n_head_kv, meta.n_embd // max(1, meta.n_head))
        plan = plan_offload(n_gpu_layers, meta.file_size, meta.n_layers, kv, gpu, hardware.gpu_free_bytes(gpu))
        self.offload = plan.description
        self._model = load_model(meta.path, plan.n_gpu_layers)
        self._ctx = self._batch = None
        try:
            cp = L.llama_context_default_params()
            # llama.cpp rounds each sequence's cells up to a multiple of 256 (with a warning): asked for here
            cp.n_ctx, cp.n_seq_max, cp.kv_unified = self.n_seq * -(-n_ctx // 256) * 256, self.n_seq, False
            cp.n_batch, cp.n_ubatch = n_batch, min(N_UBATCH, n_batch)
            cp.n_threads = cp.n_threads_batch = n_threads or hardware.cpu_count()
            if cb_eval is not None:
                cp.cb_eval = cb_eval
            self._ctx = L.llama_init_from_model(self._model, cp)
            if not self._ctx:
                raise YiLocalError(f"llama.cpp could not create a context of {cp.n_ctx} tokens for {meta.path}",
                                   hint="try a smaller --ctx")  # fmt: skip
            self.n_batch = L.llama_n_batch(self._ctx)
            self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
            self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LogitsPass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        L = self._L
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def run(self, w: Windows, first: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first window, logits) per group of windows decoded together: logits[s, k] are window
        (first + s)'s logits at position w.first + k, for k < w.n_scored. Valid until the next step.

        `first`: ask for logits from this position instead (0: every position, as llama-imatrix asks,
        so that llama.cpp computes the last layer's feed-forward for every token); then logits[s, k]
        are position first + k's, for every k."""
        L, n_ctx = self._L, w.n_ctx
        keep = w.n_scored if first is None else n_ctx - first
        first = w.first if first is None else first
        n_out = n_ctx - first  # llama-perplexity asks for the last position's logits too, unused
        whole = n_ctx <= self.n_batch  # else a window takes several decodes, its logits gathered here
        gathered = None if whole else np.empty((1, n_out, self.n_vocab), dtype=np.float32)
        for c in range(0, w.n_chunk, self.n_seq):
            n_seqs = min(self.n_seq, w.n_chunk - c)
            L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
            window = w.tokens[c * n_ctx : (c + n_seqs) * n_ctx].reshape(n_seqs, n_ctx).copy()
            if w.bos is not None:
                window[:, 0] = w.bos
            done = 0
            for start in range(0, n_ctx, self.n_batch if not whole else n_ctx):
                end = min(n_ctx, start + self.n_batch) if not whole else n_ctx
                n = self._fill(window[:, start:end], start, first)
                if L.llama_decode(self._ctx, self._batch) != 0:
                    raise YiLocalError(f"llama.cpp failed to evaluate a batch of {self._batch.n_tokens} tokens",
                                       hint="try a smaller --ctx")  # fmt: skip
                if n:
                    logits = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(n_seqs, n, self.n_vocab))
                    if whole:
                        yield c, logits[:, :keep]
                    else:
                        gathered[:, done : done + n] = logits
                        done += n
            if not whole:
                yield c, gathered[:, :keep]

    def _fill(self, tokens: np.ndarray, pos0: int, first: int) -> int:
        """The batch: each row of `tokens` a sequence from position `pos0`; logits from `first` on.
        Returns how many outputs each sequence has."""
        b = self._batch
        n_seqs, n = tokens.shape
        total = n_seqs * n
        np.ctypeslib.as_array(b.token, shape=(self.n_batch,))[:total] = tokens.ravel()
        pos = np.arange(pos0, pos0 + n, dtype=np.int32)
        np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))[:total] = np.tile(pos, n_seqs)
        np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))[:total] = np.tile(pos >= first, n_seqs)
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:total] = 1
        for i in range(total):
            b.seq_id[i][0] = i // n
        b.n_tokens = total
        return int((pos >= first).sum())
