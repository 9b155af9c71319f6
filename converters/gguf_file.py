"""Stream planned tensors into a GGUF file, a few chunks in flight, then check what was written.

`GGUFWriter` writes the header, metadata and tensor infos; the tensor data is converted chunk
by chunk on a thread pool (numpy and file I/O release the GIL) and written in order, so memory
holds only the chunks in flight, never a whole tensor.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFWriter

from converters.checkpoint import ShardReader
from converters.sink import Sink, open_sink
from converters.tensors import TensorPlan, convert_rows, permute_rows
from yi_local.errors import YiLocalError
from yi_local.gguf_header import read_header

ProgressFn = Callable[[int], None]  # called with the number of source bytes just converted


def write_gguf(
    path: Path,
    writer: GGUFWriter,
    plans: list[TensorPlan],
    threads: int = 2,
    on_progress: ProgressFn | None = None,
    direct_io: bool = True,
) -> None:
    """Write `writer`'s metadata and the planned tensors to `path` (a temporary name).

    `direct_io=False` for a file that is read again right away (the quantization intermediate):
    then the page cache holding it is worth its cost.
    """
    fout = write_header(path, writer, plans)
    sink = open_sink(fout, path, direct=direct_io)
    try:
        _stream_tensors(sink, plans, threads, on_progress, writer.data_alignment)
    finally:
        sink.close()
        writer.close()


def write_header(path: Path, writer: GGUFWriter, plans: list[TensorPlan]):
    """Open `path` and write the header, metadata and tensor infos of `plans`; the open file, at the data."""
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.out_type)
    writer.open_output_file(path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    return fout


def _stream_tensors(sink: Sink, plans: list[TensorPlan], threads: int, on_progress: ProgressFn | None, align: int) -> None:
    n_slots = max(1, threads) + 1
    values = max((max(b - a for a, b in p.row_chunks()) * p.src.row_len for p in plans), default=1)
    itemsize = max((p.src.itemsize for p in plans), default=4)
    free: list[_Slot] = [_Slot(values, itemsize) for _ in range(n_slots)]
    pending: deque[tuple[Future, _Slot, TensorPlan, bool, int]] = deque()

    def work(plan: TensorPlan, fd: int | None, start: int, stop: int, slot: _Slot) -> np.ndarray:
        rows = plan.src.read_rows(fd, start, stop, slot.src)
        if plan.permute_heads:
            permuted = permute_rows(rows, plan.permute_heads * (stop - start) // plan.src.n_rows)
            rows = slot.permuted[: rows.nbytes].view(rows.dtype).reshape(rows.shape)
            np.copyto(rows, permuted)
        if len(plan.shape) == 1:
            rows = rows.reshape(-1)
        return convert_rows(rows, plan.src.dtype, plan.out_type, slot.scratch, slot.out)

    def write_oldest() -> None:
        future, buf, plan, last, src_bytes = pending.popleft()
        data = future.result()
        sink.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        if last:
            pad = GGUFWriter.ggml_pad(plan.nbytes, align) - plan.nbytes
            sink.write(memoryview(b"\0" * pad))
        free.append(buf)
        if on_progress:
            on_progress(src_bytes)

    with ShardReader() as shards, ThreadPoolExecutor(max(1, threads)) as pool:
        try:
            for plan in plans:
                fd = shards.fd_for(plan.src)
                chunks = plan.row_chunks()
                for i, (start, stop) in enumerate(chunks):
                    while not free:
                        write_oldest()
                    buf = free.pop()
                    src_bytes = (stop - start) * plan.src.row_len * plan.src.itemsize
                    future = pool.submit(work, plan, fd, start, stop, buf)
                    pending.append((future, buf, plan, i == len(chunks) - 1, src_bytes))
            while pending:
                write_oldest()
        finally:
            for future, *_ in pending:
                future.cancel()


class _Slot:
    """Buffers for one chunk in flight, reused so the conversion loop allocates nothing."""

    def __init__(self, values: int, itemsize: int) -> None:
        self.src = np.empty(values * itemsize, dtype=np.uint8)
        self.permuted = np.empty(values * itemsize, dtype=np.uint8)
        self.scratch = np.empty(values, dtype=np.float32)
        self.out = np.empty(values * 4, dtype=np.uint8)  # F32 output is the widest: 4 bytes per value


def verify_gguf(path: Path, plans: list[TensorPlan]) -> None:
    """Reopen a written GGUF and check its tensors against the plan before it is renamed into place."""
    header = read_header(path)  # also refuses a file whose tensors run past its end
    if len(header.tensors) != len(plans):
        raise YiLocalError(f"{path.name}: {len(header.tensors)} tensors written, {len(plans)} planned")
    for t, p in zip(header.tensors, plans):
        if t.name != p.name or t.type != p.out_type or t.n_bytes != p.nbytes or t.shape != tuple(p.shape):
            raise YiLocalError(f"{path.name}: tensor {t.name} was written wrongly (expected {p.name}, {p.out_type.name})")
