"""The chat's frame pacing: free frames with a core to spare, a small share of a core when the model's
threads keep every core busy (each millisecond of UI is then one the model waits)."""

from __future__ import annotations

import pytest

from tui.pacing import BUSY_SHARE, FRAME_S, MAX_FRAME_S, FramePacer, frame_gap
from yi_local.runtime.backend import ModelInfo


@pytest.mark.parametrize("process_cpu, cores", [(0.5, 2), (1.0, 4), (3.2, 4), (0.0, 1)])
def test_a_spare_core_paints_every_frame(process_cpu, cores):
    # One second of wall time; the process used `process_cpu` seconds of CPU; the UI an expensive 60 ms.
    assert frame_gap(0.060, process_cpu, 1.0, cores) == FRAME_S


@pytest.mark.parametrize("ui_cpu, expected", [(0.0005, FRAME_S), (0.005, 0.005 / BUSY_SHARE), (0.015, 1.5),
                                              (0.060, MAX_FRAME_S)])  # fmt: skip
def test_busy_cores_give_the_ui_a_small_share(ui_cpu, expected):
    # Two cores, both busy for the whole second (the model's two threads and the UI).
    gap = frame_gap(ui_cpu, 2.0, 1.0, 2)
    assert gap == pytest.approx(expected)
    if FRAME_S < gap < MAX_FRAME_S:
        assert ui_cpu / gap == pytest.approx(BUSY_SHARE)


def test_no_time_passed():
    assert frame_gap(0.0, 0.0, 0.0, 2) == FRAME_S


def test_the_pacer_reads_this_process(monkeypatch):
    clock = {"wall": 100.0, "process": 10.0, "ui": 1.0}
    monkeypatch.setattr(FramePacer, "_now", staticmethod(lambda: (clock["wall"], clock["process"], clock["ui"])))
    pacer = FramePacer(cores=2)
    clock.update(wall=100.5, process=10.99, ui=1.01)  # half a second, both cores busy, 10 ms of UI
    assert pacer.gap() == pytest.approx(0.01 / BUSY_SHARE)
    clock.update(wall=101.0, process=11.2, ui=1.05)  # the next half second, 1.6 cores idle
    assert pacer.gap() == FRAME_S


def test_the_first_frame_assumes_a_model_on_the_cpu_keeps_every_core_busy(monkeypatch):
    pacer = FramePacer(cores=4)
    assert pacer.first_gap(0.010, model_on_cpu=True) == pytest.approx(0.010 / BUSY_SHARE)
    assert pacer.first_gap(0.010, model_on_cpu=False) == FRAME_S


@pytest.mark.parametrize("gpu_layers, on_cpu", [(0, True), (20, True), (33, False)])
def test_which_models_run_on_the_cpu(gpu_layers, on_cpu):
    info = ModelInfo(name="m", path="m.gguf", quantization="Q4_K_M", n_ctx=4096, n_ctx_train=4096, n_layers=33,
                     offload="x", backend="llama.cpp", chat_template=None, bos_token="", eos_token="",
                     gpu_layers=gpu_layers)  # fmt: skip
    assert info.runs_on_cpu is on_cpu
