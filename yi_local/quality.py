"""Perplexity and KL divergence of GGUFs against a reference, as llama-perplexity's --kl-divergence mode
defines them, so that the figures compare like for like with llama.cpp's.

One pass of the reference over the text keeps the log-probabilities of its scored positions in a
temporary file, in float32: a file measured against itself gets a KL divergence of exactly 0 and a top-1
agreement of exactly 1 (llama-perplexity keeps them as 16-bit steps of up to 2.4e-4, and reports
0.000001 and 99.9% there). One pass of each other file reads them back: per scored token, its negative
log-likelihood, the KL divergence sum_i p_ref(i) * (log p_ref(i) - log p(i)) over the tokens i with
log p_ref(i) > -16 (llama-perplexity's cutoff), and whether its most likely token is the reference's (the
argmax of each side's log-probabilities). PPL = exp(mean NLL), with llama-perplexity's uncertainties and
its interpolated percentile for the 99th of the KL divergences. The windows are `logits_pass`'s:
llama-perplexity's.

Nothing here prints: `yi-local quality` does.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from yi_local import hardware
from yi_local.errors import YiLocalError
from yi_local.gguf_header import ModelMeta, check_model, model_meta
from yi_local.logits_pass import LogitsPass, Windows, make_windows
from yi_local.runtime.params import MIN_CTX
from yi_local.units import format_size

KLD_CUTOFF = -16.0  # llama-perplexity adds a token's term only where the reference's log-prob is above this
ROWS_PER_TASK = 8  # scored positions per worker task: 2 MB of float32 for a 64,000-token vocabulary
DEFAULT_TEXT = "heldout.txt"  # in yi_local/texts/; never the calibration text quantization learns from

OnProgress = Callable[[str, int, int], None]  # (file name, tokens evaluated, tokens in all)


@dataclass(frozen=True)
class QualityRow:
    path: str
    name: str
    quantization: str
    size_bytes: int
    reference: bool
    ppl: float
    ppl_uncertainty: float
    kld_mean: float
    kld_mean_uncertainty: float
    kld_p99: float
    top1: float  # the share of scored tokens whose most likely next token is the reference's
    top1_uncertainty: float
    seconds: float  # this file's pass, loading included


@dataclass(frozen=True)
class QualityReport:
    rows: list[QualityRow]  # by size, smallest first
    text: str
    ctx: int
    chunks: int
    tokens_scored: int
    threads: int
    offload: str


def check_ctx(ctx: int) -> None:
    if ctx < MIN_CTX or ctx % 2:
        raise YiLocalError(f"--ctx {ctx}: a window must be an even number of tokens, at least {MIN_CTX}",
                           hint="the second half of each window is scored; llama-perplexity's default is 512")  # fmt: skip


def read_text(path: str | os.PathLike[str] | None) -> tuple[bytes, str]:
    """(the text's bytes, how to name it): `path`, or the held-out text shipped with yi-local."""
    if path is None:
        source = resources.files("yi_local") / "texts" / DEFAULT_TEXT
        try:
            return source.read_bytes(), f"{DEFAULT_TEXT} (built in)"
        except OSError:
            raise YiLocalError(f"yi-local's held-out text {DEFAULT_TEXT} is missing",
                               hint="reinstall yi-local, or give a text with --text FILE") from None  # fmt: skip
    try:
        return Path(path).read_bytes(), str(path)
    except OSError as e:
        raise YiLocalError(f"--text {path} cannot be read: {e.strerror}", hint="give the path of a text file") from None


def check_same_vocabulary(ref: ModelMeta, other: ModelMeta) -> None:
    """Token ids must mean the same in both files, or comparing distributions means nothing."""
    a, b = ref.tokens or [], other.tokens or []
    if a == b:
        return
    if len(a) != len(b):
        detail = f"{len(b):,} tokens, the reference {len(a):,}"
    else:
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        detail = f"token {i} is {b[i].decode(errors='replace')!r}, in the reference {a[i].decode(errors='replace')!r}"
    raise YiLocalError(
        f"{other.path} has another vocabulary than the reference {ref.path} ({detail})",
        hint="KL divergence compares the same tokens' probabilities: give files converted from the same model",
    )


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's: the mean and its standard error (0 for 10 values or fewer)."""
    n = len(values)
    v = values.astype(np.float64)
    mean = float(v.sum() / n)
    var = float((v * v).sum() / n - mean * mean)
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's interpolated percentile, in its float32 arithmetic."""
    v = sorted_values.astype(np.float32)
    p = np.float32(fraction) * np.float32(len(v) - 1)
    i = int(p)
    p -= np.float32(i)
    return float((np.float32(1) - p) * v[i] + p * v[min(i + 1, len(v) - 1)])


def log_softmax(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Rows of log-probabilities (float32) into `out`: the same bits for the same logits, whatever `out` is."""
    np.subtract(x, x.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=scratch)
    return np.subtract(out, np.log(scratch.sum(axis=1, keepdims=True)), out=out)


def kl_divergence(ref: np.ndarray, lp: np.ndarray, a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, sum over p_ref > exp(-16) of p_ref * (log p_ref - log p); `a`, `b` and `mask` are scratch.
    Exactly 0 where lp == ref. (A multiply by the mask: indexing with it costs twice the rest together.)"""
    np.subtract(ref, lp, out=b)
    np.exp(ref, out=a)
    np.multiply(a, b, out=a)
    np.greater(ref, KLD_CUTOFF, out=mask)
    return np.multiply(a, mask, out=a).sum(axis=1)


@dataclass
class _Scores:
    """Per scored token, in text order."""

    nll: np.ndarray
    top: np.ndarray  # the most likely token
    kld: np.ndarray | None = None


def _evaluate(pass_: LogitsPass, w: Windows, pool: ThreadPoolExecutor, store: np.ndarray, reference: _Scores | None,
              report: Callable[[int], None]) -> _Scores:  # fmt: skip
    """One pass: the reference's (writes `store`) or another file's (reads it and scores against it)."""
    n = w.n_chunk * w.n_scored
    scores = _Scores(np.empty(n, np.float32), np.empty(n, np.int32), None if reference is None else np.empty(n))
    scratch = threading.local()  # each worker's buffers: fresh large arrays would cost a page fault per 4 KB

    def rows(logits: np.ndarray, chunk: int, r0: int, r1: int) -> None:
        if not hasattr(scratch, "a"):
            scratch.a, scratch.b = (np.empty((ROWS_PER_TASK, pass_.n_vocab), np.float32) for _ in range(2))
            scratch.mask = np.empty((ROWS_PER_TASK, pass_.n_vocab), bool)
        a, b, mask = scratch.a[: r1 - r0], scratch.b[: r1 - r0], scratch.mask[: r1 - r0]
        lp = log_softmax(logits[r0:r1], store[chunk, r0:r1] if reference is None else a, b)
        at = slice(chunk * w.n_scored + r0, chunk * w.n_scored + r1)
        scores.nll[at] = -lp[np.arange(r1 - r0), w.targets(chunk)[r0:r1]]
        scores.top[at] = lp.argmax(axis=1)
        if reference is not None:
            scores.kld[at] = kl_divergence(store[chunk, r0:r1], lp, a, b, mask)

    for c, logits in pass_.run(w):
        jobs = [pool.submit(rows, logits[s], c + s, r, min(r + ROWS_PER_TASK, w.n_scored))
                for s in range(len(logits)) for r in range(0, w.n_scored, ROWS_PER_TASK)]  # fmt: skip
        for job in jobs:
            job.result()
        report((c + len(logits)) * w.n_ctx)
    return scores


def _row(meta: ModelMeta, scores: _Scores, ref: _Scores, seconds: float, is_ref: bool) -> QualityRow:
    log_ppl, log_ppl_unc = mean_and_uncertainty(scores.nll)
    ppl = math.exp(log_ppl)
    kld = scores.kld if scores.kld is not None else np.zeros(len(scores.nll))
    kld_mean, kld_unc = mean_and_uncertainty(kld)
    top1 = float(np.mean(scores.top == ref.top))
    return QualityRow(
        path=str(meta.path), name=meta.path.name, quantization=meta.quantization, size_bytes=meta.file_size,
        reference=is_ref, ppl=ppl, ppl_uncertainty=ppl * log_ppl_unc, kld_mean=kld_mean,
        kld_mean_uncertainty=kld_unc, kld_p99=percentile(np.sort(kld.astype(np.float32)), 0.99), top1=top1,
        top1_uncertainty=math.sqrt(top1 * (1 - top1) / (len(kld) - 1)),
        seconds=seconds,
    )  # fmt: skip


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def measure_quality(models: Sequence[str | os.PathLike[str]], ref: str | os.PathLike[str],
                    text: str | os.PathLike[str] | None = None, ctx: int = 512, chunks: int | None = None,
                    threads: int | None = None, on_progress: OnProgress | None = None) -> QualityReport:  # fmt: skip
    """Score every file in `models` against `ref` on `text` (None: the built-in held-out text).

    The reference gets a row of its own (its perplexity; KL divergence 0); a file that is the reference
    is not evaluated twice. Raises YiLocalError for a missing or damaged file, a vocabulary that is not
    the reference's, a text too short for two windows, or too little room for the reference's log-probs.
    """
    check_ctx(ctx)
    ref_meta = model_meta(check_model(ref))
    others: list[ModelMeta] = []
    for path in models:
        meta = model_meta(check_model(path))
        check_same_vocabulary(ref_meta, meta)
        if not any(_same_file(meta.path, m.path) for m in [ref_meta, *others]):
            others.append(meta)
    data, source = read_text(text)
    w = make_windows(ref_meta.path, data, ctx, chunks, source)
    threads = threads or hardware.cpu_count()
    n_vocab = len(ref_meta.tokens or [])
    report = on_progress or (lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="yi-local-quality-") as tmp, ThreadPoolExecutor(threads) as pool:
        need = w.n_chunk * w.n_scored * n_vocab * 4
        free = shutil.disk_usage(tmp).free
        if need > free:
            raise YiLocalError(
                f"the reference's log-probabilities need {format_size(need)} in {tempfile.gettempdir()}, which has "
                f"{format_size(free)} free",
                hint="point TMPDIR at a disk with more room, or score fewer windows with --chunks",
            )  # fmt: skip
        store = np.lib.format.open_memmap(Path(tmp) / "reference-logprobs.npy", mode="w+", dtype=np.float32,
                                          shape=(w.n_chunk, w.n_scored, n_vocab))  # fmt: skip
        total = w.n_chunk * w.n_ctx
        results: list[tuple[ModelMeta, _Scores, float]] = []
        offload = ""
        for meta in [ref_meta, *others]:
            started = time.perf_counter()
            with LogitsPass(meta, ctx, threads) as pass_:
                offload = pass_.offload
                if pass_.n_vocab != n_vocab:
                    raise YiLocalError(f"llama.cpp reads {pass_.n_vocab:,} tokens in {meta.path}, its header lists "
                                       f"{n_vocab:,}", hint="the file may be damaged; convert it again")  # fmt: skip
                scores = _evaluate(pass_, w, pool, store, results[0][1] if results else None,
                                   lambda done, name=meta.path.name: report(name, done, total))  # fmt: skip
            results.append((meta, scores, time.perf_counter() - started))
        del store
    ref_scores = results[0][1]
    rows = [_row(meta, scores, ref_scores, seconds, i == 0) for i, (meta, scores, seconds) in enumerate(results)]
    rows.sort(key=lambda r: (r.size_bytes, not r.reference, r.name))
    return QualityReport(rows, source, ctx, w.n_chunk, w.n_chunk * w.n_scored, threads, offload)
