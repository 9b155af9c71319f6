"""The margin rule for batched output: batched arithmetic may round differently from a solo run, so a
batched reply must equal the solo one up to the first step where the solo run's top-two logit margin is
MARGIN or less (a near tie, where either token is right).

MARGIN is measured, not assumed: llama.cpp's CPU flash attention rounds Q, K and its sums to fp16 in the
order of the cache's cells, which other sequences shuffle. On the tests' tiny model (logits of size ~1),
30 batched replies diverged from their solo runs only where the solo margin was at most 0.009 (0.002 with
flash attention off). Cross-talk (another sequence's cells, sampler or bias) changes tokens at any margin."""

from __future__ import annotations

import numpy as np

MARGIN = 0.05


def margins(backend, prompt: list[int], generated: list[int]) -> list[float]:
    """The solo run's top-two logit margin before each generated token (one sequence alone in its batches)."""
    L = backend._L
    backend.reset()
    tokens = prompt + generated
    n_batch = backend.n_batch
    batch = L.llama_batch_init(n_batch, 0, 1)
    out = []
    try:
        for start in range(0, len(tokens), n_batch):
            piece = tokens[start : start + n_batch]
            for i, t in enumerate(piece):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = len(prompt) - 1 <= start + i < len(tokens) - 1
            batch.n_tokens = len(piece)
            assert L.llama_decode(backend._ctx, batch) == 0
            for i in range(len(piece)):
                if batch.logits[i]:
                    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(backend._ctx, i), shape=(backend.n_vocab,))
                    top = np.partition(logits, -2)[-2:]
                    out.append(float(top[1] - top[0]))
        return out
    finally:
        L.llama_batch_free(batch)
        backend._slot_truncate(0, 0)
        backend.reset()


def assert_same_under_margin(backend, prompt, solo_ids, batched_ids) -> None:
    clear = margins(backend, prompt, solo_ids)
    for i, (a, b) in enumerate(zip(solo_ids, batched_ids)):
        if clear[i] <= MARGIN:
            return  # a near tie: from here on either is right
        assert a == b, f"token {i} differs from the solo run (margin {clear[i]:.4f})"
    assert len(solo_ids) == len(batched_ids)


def clear_prefix(backend, prompt: list[int], solo_ids: list[int]) -> int:
    """How many of the solo run's tokens any batched run must reproduce."""
    clear = margins(backend, prompt, solo_ids)
    return next((i for i, m in enumerate(clear) if m <= MARGIN), len(solo_ids))
