"""Compute an importance matrix in-process, as llama.cpp's llama-imatrix does, without torch.

The model evaluates the calibration text in windows of `n_ctx` tokens (each starting with BOS, several
windows to a batch); ggml's scheduler hands every matrix multiplication whose weight is a `blk.*`
tensor to `cb_eval`, where the squared input activations are summed per column. The result is what
llama-imatrix writes (see imatrix_file.py), entry for entry.
"""

from __future__ import annotations

import ctypes
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.imatrix_file import Entry, Imatrix
from converters.progress import NullProgress, Progress
from yi_local.errors import YiLocalError
from yi_local.gguf_header import check_model, model_meta
from yi_local.llama_lib import llama_cpp
from yi_local.logits_pass import LogitsPass, Windows, text_tokens

N_CTX = 512  # llama-imatrix's default window
N_BATCH = 2048  # tokens per llama_decode: four windows, as llama-imatrix batches them
MIN_ROWS = 16  # llama-imatrix ignores smaller multiplications


class GgmlTensor(ctypes.Structure):
    """ggml.h's `struct ggml_tensor`, checked against the library by `_Ggml` before any use."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Ggml:
    """The few ggml functions the collector needs, and the struct layout proven on a probe tensor."""

    def __init__(self) -> None:
        import llama_cpp._ctypes_extensions as ext

        lib = ext.load_shared_library("ggml-base", Path(llama_cpp().__file__).parent / "lib")
        for name, res, args in (
            ("ggml_init", ctypes.c_void_p, [_InitParams]),
            ("ggml_free", None, [ctypes.c_void_p]),
            ("ggml_new_tensor_2d", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
            ("ggml_set_name", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
            ("ggml_get_data", ctypes.c_void_p, [ctypes.c_void_p]),
            ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
            ("ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
            ("ggml_backend_buffer_is_host", ctypes.c_bool, [ctypes.c_void_p]),
            ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib
        self.mul_mat = next(i for i in range(256) if lib.ggml_op_name(i) == b"MUL_MAT")
        self._check_layout()

    def _check_layout(self) -> None:
        lib = self.lib
        ctx = lib.ggml_init(_InitParams(1 << 16, None, False))
        try:
            ptr = lib.ggml_new_tensor_2d(ctx, 0, 3, 5)  # F32, 3 columns, 5 rows
            lib.ggml_set_name(ptr, b"yi-local probe")
            t = GgmlTensor.from_address(ptr)
            seen = (t.type, tuple(t.ne), tuple(t.nb), t.data, t.name, lib.ggml_nbytes(ptr))
            want = (0, (3, 5, 1, 1), (4, 12, 60, 60), lib.ggml_get_data(ptr), b"yi-local probe", 60)
        finally:
            lib.ggml_free(ctx)
        if seen != want:
            raise YiLocalError("this llama.cpp build's ggml_tensor layout is not the one yi-local knows",
                               hint="reinstall the llama-cpp-python version yi-local pins (see pyproject.toml)")  # fmt: skip


_ggml: _Ggml | None = None
_ggml_lock = threading.Lock()


def ggml() -> _Ggml:
    global _ggml
    with _ggml_lock:
        if _ggml is None:
            _ggml = _Ggml()
        return _ggml


def weight_name(raw: bytes) -> str:
    """The weight's own name: llama.cpp names some graph copies `prefix#name#suffix`."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The `cb_eval` callback: sums of squared inputs per weight column, in float64.

    `last`: the weight of the graph's last collected multiplication (the last layer's ffn_down). Once
    it is collected the graph is stopped: all that is left is the output norm and the vocabulary-wide
    output multiplication, whose logits nothing reads (a sixth of the work of an 8-layer Yi-6B; 4.5% of
    the 32-layer one). llama-imatrix computes them."""

    def __init__(self, last: str | None = None) -> None:
        self.last = last
        self.stops = 0  # graphs stopped after `last`
        self.g = ggml()
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self.signals = _DeferredSignals()
        self._last: tuple[int, np.ndarray, int] | None = None  # (input tensor, its sums, rows) last collected
        self._copy = np.empty(0, dtype=np.uint8)
        self.callback = llama_cpp().ggml_backend_sched_eval_callback(self._eval)

    def _eval(self, ptr: int, ask: bool, _user) -> bool:
        if self.error is not None or self.signals.received:
            # Stop the graph at once: asked, say yes; called back, say stop. compute_imatrix raises the
            # error, or lets the signal act, when llama_decode returns.
            return ask
        try:
            if self._last is not None and ptr == self._last[0]:
                self._last = None  # the input it holds sums of is being computed again: a new graph
            t = GgmlTensor.from_address(ptr)
            if t.op != self.g.mul_mat:
                return False
            src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
            if ask:
                name = weight_name(src0.name)
                if not (src1.ne[1] >= MIN_ROWS and src1.type == 0 and name.startswith("blk.")):
                    return False
                if self._last is not None and self._last[0] == t.src[1] and src0.ne[2] * src0.ne[3] == 1:
                    # The input the last collected multiplication had (q/k/v share one, gate/up another):
                    # the same sums, and no stop of the graph to read them again.
                    self._accumulate(name, 1, self._last[1], self._last[2])
                    return False
                return True
            name = weight_name(src0.name)
            self._add(name, src0, src1, t.src[1])
            if name == self.last:
                self.stops += 1
                return False  # stop this graph here: ggml's scheduler leaves the rest of it uncomputed
        except BaseException as e:  # an exception must not cross back into C
            self.error = self.error or e
        return True  # False would stop the graph's computation

    def _add(self, name: str, w: GgmlTensor, x: GgmlTensor, x_ptr: int) -> None:
        ne, nb = tuple(x.ne), tuple(x.nb)
        span = sum((n - 1) * s for n, s in zip(ne[1:], nb[1:])) + ne[0] * 4
        if self.g.lib.ggml_backend_buffer_is_host(x.buffer):
            base = np.frombuffer((ctypes.c_char * span).from_address(x.data), dtype=np.float32)
        else:  # a GPU buffer: copy it to the host first
            if self._copy.size < span:
                self._copy = np.empty(span, dtype=np.uint8)
            self.g.lib.ggml_backend_tensor_get(x_ptr, self._copy.ctypes.data, 0, span)
            base = self._copy[:span].view(np.float32)
        acts = np.lib.stride_tricks.as_strided(base, shape=ne[::-1], strides=(nb[3], nb[2], nb[1], 4), writeable=False)
        n_mat = w.ne[2] * w.ne[3]
        # Per 2-D slice, summed in float32 (10x faster than in float64, as llama-imatrix sums), then
        # accumulated in float64. Stacked matrices (experts): slice (i2, i3) goes to matrix (i3 % ne3) * ne2 + i2 % ne2.
        sums = np.zeros((n_mat, ne[0]), dtype=np.float64)
        for i3 in range(ne[3]):
            for i2 in range(ne[2]):
                rows = acts[i3, i2]
                sums[(i3 % w.ne[3]) * w.ne[2] + i2 % w.ne[2]] += np.einsum("ij,ij->j", rows, rows)
        rows_per_mat = ne[1] * ne[2] * ne[3] // n_mat
        self._accumulate(name, n_mat, sums, rows_per_mat)
        self._last = (x_ptr, sums, rows_per_mat) if n_mat == 1 else None

    def _accumulate(self, name: str, n_mat: int, sums: np.ndarray, rows: int) -> None:
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros((n_mat, sums.shape[1]), dtype=np.float64)
        acc += sums
        self.counts[name] = self.counts.get(name, 0) + rows

    def new_graph(self) -> None:
        """Before each group of windows: a tensor's address says nothing across graphs."""
        self._last = None


class _DeferredSignals:
    """While llama.cpp computes, Ctrl+C, SIGTERM and SIGHUP are noted, not raised: a KeyboardInterrupt
    raised inside a ctypes callback would be lost. The callback then stops the graph, and the signal's
    own handler runs (raising as usual) once llama_decode has returned."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> _DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                handler = signal.getsignal(sig)
                if callable(handler):  # Python handlers only: an ignored or default signal stays so
                    self._saved[sig] = handler
                    signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, _frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def deliver(self) -> None:
        """Run the handler of the signal that came (it raises, e.g. KeyboardInterrupt)."""
        if self.received is not None:
            signum, self.received = self.received, None
            signal.raise_signal(signum)


@dataclass(frozen=True)
class CalibrationText:
    text: str
    name: str  # recorded as the dataset: a file's name, or the packaged text's


def compute_imatrix(model: Path, calibration: CalibrationText, threads: int, progress: Progress | None = None,
                    n_ctx: int = N_CTX, n_batch: int = N_BATCH, max_chunks: int | None = None,
                    stop_early: bool = True) -> Imatrix:  # fmt: skip
    """The importance matrix of `model` (a GGUF llama.cpp can run) over the calibration text (its first
    `max_chunks` windows, as llama-imatrix's --chunks). `stop_early=False` computes each graph to its
    end (the logits too), as llama-imatrix does: the same matrix, slower."""
    progress = progress or NullProgress()
    meta = model_meta(check_model(model))
    tokens, bos = text_tokens(model, calibration.text.encode("utf-8"))
    if len(tokens) < 2 * n_ctx:
        raise YiLocalError(
            f"the calibration text {calibration.name} has {len(tokens)} tokens; an importance matrix needs "
            f"at least {2 * n_ctx} (two windows of {n_ctx})",
            hint="give a longer --calibration text, or leave --calibration out to use the packaged one",
        )
    n_chunks = len(tokens) // n_ctx if max_chunks is None else min(len(tokens) // n_ctx, max_chunks)
    windows = Windows(tokens, n_ctx, n_chunks, bos)
    collector = _Collector(f"blk.{meta.n_layers - 1}.ffn_down.weight" if stop_early else None)
    # Windows as llama-perplexity and llama-imatrix lay them out, on the CPU (the activations are read in
    # place); logits asked at every position, as llama-imatrix asks, so that the last layer runs on every
    # token (the logits themselves are never computed: see _Collector).
    with LogitsPass(meta, n_ctx, threads, n_gpu_layers=0, n_batch=n_batch, cb_eval=collector.callback) as pass_:
        steps = pass_.run(windows, first=0)
        task = progress.task("importance matrix", n_chunks * n_ctx, unit="tokens")
        try:
            while True:
                collector.new_graph()
                try:
                    with collector.signals:
                        step = next(steps, None)
                except YiLocalError:
                    if collector.error is None and collector.signals.received is None:
                        raise
                    step = None  # the graph was stopped on purpose: the reason is raised below
                collector.signals.deliver()
                if collector.error is not None:
                    raise collector.error
                if step is None:
                    break
                task.advance(min(pass_.n_seq, n_chunks - step[0]) * n_ctx)
        finally:
            task.close()
    if not collector.sums:
        raise YiLocalError(f"no matrix multiplications of {model.name} were seen while computing the importance matrix")
    entries = {
        name: Entry(sums=acc.astype(np.float32), counts=np.full(acc.shape[0], collector.counts[name], dtype=np.int64))
        for name, acc in collector.sums.items()
    }
    chunk_count = math.floor(max(collector.counts.values()) / n_ctx)
    return Imatrix(entries=entries, datasets=[calibration.name], chunk_count=chunk_count, chunk_size=n_ctx)
