"""Quantizing with an importance matrix: the IQ levels, provenance, reuse, and the errors on the way."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gguf import GGUFReader

from converters.convert import convert, requantize
from converters.imatrix import CalibrationText, compute_imatrix
from converters.imatrix_file import read_imatrix, write_imatrix
from converters.importance import ImatrixRequest
from tests.conftest import CORPUS, run_cli
from yi_local.errors import YiLocalError
from yi_local.quant_types import QUANT_TYPES


@pytest.fixture(scope="module")
def matrix_file(ggufs, tmp_path_factory):
    """A small matrix of the tiny chat model (the corpus, in windows of 64)."""
    m = compute_imatrix(ggufs["f16"], CalibrationText(CORPUS.read_text("utf-8") * 2, "corpus.txt"), threads=2,
                        n_ctx=64, n_batch=128)  # fmt: skip
    path = tmp_path_factory.mktemp("matrix") / "tiny.imatrix.gguf"
    write_imatrix(path, m)
    return path


def _llama_quantize(src, dest, ftype: int) -> int:
    """llama.cpp's quantizer with no importance matrix and none of yi-local's checks."""
    from yi_local.llama_lib import llama_cpp

    L = llama_cpp()
    params = L.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    return L.llama_model_quantize(os.fsencode(src), os.fsencode(dest), ctypes.byref(params))


def test_the_levels_marked_as_needing_a_matrix_are_the_ones_llama_cpp_refuses_without(ggufs, tmp_path):
    refused = {name for name, q in QUANT_TYPES.items() if _llama_quantize(ggufs["f16"], tmp_path / f"{name}.gguf", q.ftype) != 0}
    assert refused == {name for name, q in QUANT_TYPES.items() if q.needs_imatrix}


def test_iq_levels_quantize_with_a_matrix_load_and_generate(ggufs, matrix_file, tmp_path):
    from yi_local.runtime.llama_cpp_backend import LlamaCppBackend
    from yi_local.runtime.params import LoadOptions, SamplingParams

    # One of each family; IQ1_*, IQ2_XS, IQ2_S, IQ2_M and IQ3_XXS first build lookup grids that take llama.cpp
    # 10-30 s (they are refused without a matrix in the test above, and IQ3_M is pulled below).
    levels = ["IQ2_XXS", "Q2_K_S", "IQ3_XS", "IQ4_XS"]
    result = requantize(ggufs["f16"], tmp_path, levels, threads=2, imatrix=ImatrixRequest(file=matrix_file))
    for path, level in zip(result.files, levels):
        reader = GGUFReader(path)
        assert reader.get_field("general.file_type").contents() == QUANT_TYPES[level].ftype
        assert reader.get_field("quantize.imatrix.file").contents() == matrix_file.name
    backend = LlamaCppBackend(result.files[levels.index("IQ2_XXS")], LoadOptions(n_ctx=256))
    try:
        events = list(backend.generate([1, 6, 100, 200], SamplingParams(max_tokens=8, temperature=0.0)))
    finally:
        backend.close()
    from yi_local.runtime.events import Finish

    assert events[-1].usage.completion_tokens == 8 and isinstance(events[-1], Finish)


def test_the_matrix_changes_the_weights_and_is_recorded(ggufs, matrix_file, tmp_path):
    plain = requantize(ggufs["f16"], tmp_path / "plain.gguf", ["Q2_K"]).files[0]
    weighted = requantize(ggufs["f16"], tmp_path / "weighted.gguf", ["Q2_K"], imatrix=ImatrixRequest(file=matrix_file)).files[0]
    a, b = GGUFReader(plain), GGUFReader(weighted)
    assert a.get_field("quantize.imatrix.file") is None
    fields = {k: b.get_field(k).contents() for k in ("quantize.imatrix.file", "quantize.imatrix.dataset",
                                                    "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count")}  # fmt: skip
    assert fields == {"quantize.imatrix.file": "tiny.imatrix.gguf", "quantize.imatrix.dataset": "corpus.txt",
                      "quantize.imatrix.entries_count": 14, "quantize.imatrix.chunks_count": fields["quantize.imatrix.chunks_count"]}  # fmt: skip
    assert fields["quantize.imatrix.chunks_count"] > 10
    ta = {t.name: np.array(t.data) for t in a.tensors}
    changed = [t.name for t in b.tensors if t.name.startswith("blk.") and not np.array_equal(np.array(t.data), ta[t.name])]
    assert "blk.0.ffn_down.weight" in changed and "blk.1.attn_q.weight" in changed
    shown = run_cli("show", str(weighted))
    assert shown.returncode == 0
    assert "imatrix        tiny.imatrix.gguf (computed on corpus.txt" in shown.stdout
    assert "imatrix        none" in run_cli("show", str(plain)).stdout


def test_convert_imatrix_end_to_end_saves_a_reusable_matrix(chat_dir, tmp_path):
    """--calibration on a folder (implies --imatrix): the matrix saved beside the outputs, then reused."""
    out = tmp_path / "out"
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS.read_text("utf-8") * 3)
    first = run_cli("convert", str(chat_dir), "--q", "IQ2_XS", "--calibration", str(text), "--threads", "1", "-o", str(out))
    assert first.returncode == 0, first.stderr
    matrix = out / f"{chat_dir.name}.imatrix.gguf"
    assert f"wrote {matrix} (importance matrix, " in first.stdout and " windows of calib.txt)" in first.stdout
    assert read_imatrix(matrix).datasets == ["calib.txt"]
    made = GGUFReader(out / f"{chat_dir.name}-IQ2_XS.gguf")
    assert made.get_field("quantize.imatrix.dataset").contents() == "calib.txt"
    again = run_cli("convert", str(chat_dir), "--q", "IQ2_XS", "--imatrix-file", str(matrix), "-o", str(tmp_path / "again.gguf"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.gguf").read_bytes() == (out / f"{chat_dir.name}-IQ2_XS.gguf").read_bytes()


def test_calibration_file_is_used_and_named(ggufs, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text(CORPUS.read_text("utf-8") * 3)
    r = run_cli("convert", str(ggufs["f16"]), "--q", "Q3_K_M", "--calibration", str(text), "-o", str(tmp_path / "o.gguf"))
    assert r.returncode == 0, r.stderr
    assert GGUFReader(tmp_path / "o.gguf").get_field("quantize.imatrix.dataset").contents() == "mine.txt"
    assert (tmp_path / f"{ggufs['f16'].stem}.imatrix.gguf").is_file() or (tmp_path / "Yi-Tiny-chat.imatrix.gguf").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--q", "IQ2_XS"], "IQ2_XS needs an importance matrix"),
        (["--q", "IQ1_M", "--q", "IQ3_XXS"], "IQ1_M, IQ3_XXS need an importance matrix"),
        (["--q", "Q2_K", "--imatrix", "--imatrix-file", "x.gguf"], "give one of them"),
        (["--imatrix"], "add --q TYPE"),
        (["--q", "Q2_K", "--calibration", "missing.txt"], "cannot read the calibration text"),
        (["--q", "Q2_K", "--imatrix-file", "missing.gguf"], "cannot read the importance matrix"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(chat_dir, tmp_path, extra, message):
    r = run_cli("convert", str(chat_dir), *extra, "-o", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.gguf"))


def test_a_short_or_binary_calibration_text_is_a_clear_error(ggufs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = run_cli("convert", str(ggufs["f16"]), "--q", "Q2_K", "--calibration", str(short), "-o", str(tmp_path / "o.gguf"))
    assert r.returncode == 1 and "needs at least 1024" in r.stderr and "--calibration" in r.stderr
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 100)
    r = run_cli("convert", str(ggufs["f16"]), "--q", "Q2_K", "--calibration", str(binary), "-o", str(tmp_path / "o.gguf"))
    assert r.returncode == 1 and "is not UTF-8 text" in r.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_a_matrix_of_another_model_is_refused(chat_dir, tmp_path):
    """A matrix whose rows do not match: llama.cpp would stop halfway; yi-local says so first."""
    from converters.imatrix_file import Entry, Imatrix

    other = Imatrix(entries={"blk.0.attn_q.weight": Entry(np.ones((1, 4096), np.float32), np.array([512]))},
                    datasets=["x"], chunk_count=1, chunk_size=512)  # fmt: skip
    path = tmp_path / "other.imatrix.gguf"
    write_imatrix(path, other)
    with pytest.raises(YiLocalError, match="is for another model: it has 4096 values for blk.0.attn_q.weight"):
        convert(chat_dir, out=tmp_path, quants=["Q2_K"], imatrix=ImatrixRequest(file=path))
    unrelated = Imatrix(entries={"foo": Entry(np.ones((1, 8), np.float32), np.array([1]))}, datasets=["x"],
                        chunk_count=1, chunk_size=512)  # fmt: skip
    write_imatrix(path, unrelated)
    with pytest.raises(YiLocalError, match="has no entry for any tensor of this model"):
        convert(chat_dir, out=tmp_path, quants=["Q2_K"], imatrix=ImatrixRequest(file=path))
    assert not list(tmp_path.glob("*Q2_K*"))


def test_pull_of_an_iq_level_computes_a_matrix_on_the_way(chat_dir):
    """`pull NAME:IQ3_M`: a matrix on the packaged calibration text, recorded in the manifest and the file;
    `pull NAME:Q2_K --imatrix` makes one at a level that has none by default, plain `pull NAME:Q3_K_M` none."""
    from tests.hub_server import Hub, HubServer
    from yi_local import store

    hub = Hub()
    hub.add_folder("01-ai/Yi-Tiny-Chat", chat_dir)
    with HubServer(hub) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        proc = run_cli("pull", "01-ai/Yi-Tiny-Chat:iq3_m", env=env)
        asked = run_cli("pull", "01-ai/Yi-Tiny-Chat:q2_k", "--imatrix", "--threads", "1", env=env)
        plain = run_cli("pull", "01-ai/Yi-Tiny-Chat:q3_k_m", env=env)
    assert proc.returncode == 0, proc.stderr
    assert asked.returncode == 0 and plain.returncode == 0, asked.stderr + plain.stderr
    models = {m.quant: m for m in store.list_models()}
    assert models["Q2_K"].options["imatrix"]["dataset"] == "yi-local/calibration.txt"
    assert GGUFReader(models["Q2_K"].path).get_field("quantize.imatrix.file") is not None
    assert "imatrix" not in models["Q3_K_M"].options
    assert GGUFReader(models["Q3_K_M"].path).get_field("quantize.imatrix.file") is None
    model = models["IQ3_M"]
    assert model.quant == "IQ3_M"
    recorded = model.options["imatrix"]
    assert recorded["dataset"] == "yi-local/calibration.txt" and recorded["entries"] == 14 and recorded["chunks"] > 10
    assert len(recorded["sha256"]) == 64
    reader = GGUFReader(model.path)
    assert reader.get_field("quantize.imatrix.dataset").contents() == "yi-local/calibration.txt"
    assert reader.get_field("quantize.imatrix.chunks_count").contents() == recorded["chunks"]
    # The store keeps the models only: no matrix file is left beside them.
    assert sorted(p.name for p in model.path.parent.iterdir() if p.suffix == ".gguf") == sorted(m.path.name for m in models.values())
    shown = run_cli("show", "01-ai/Yi-Tiny-Chat:iq3_m")
    assert "imatrix        " in shown.stdout and "computed on yi-local/calibration.txt" in shown.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_matrix_stops_it_at_once_and_leaves_nothing(ggufs, tmp_path, sig):
    """llama.cpp computes in one long call: the signal still ends the command within the graph it is in."""
    text = tmp_path / "long.txt"
    text.write_text(CORPUS.read_text("utf-8") * 400)  # minutes of windows
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "yi_local", "convert", str(ggufs["f16"]), "--q", "Q2_K",
                             "--calibration", str(text), "--threads", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(3)  # well into the matrix (the model loads in a fraction of that)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 128 + sig and "Traceback" not in err
    assert list(out.iterdir()) == []
