"""Session fixtures: tiny Yi-faithful checkpoints built at test time, and their GGUFs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from converters.convert import convert
from tests.synthetic import Dims, build_checkpoint

# A run started in the background (`make test &`) inherits SIGINT ignored, under nohup SIGHUP too, and
# so would every yi-local the tests start: the signal tests need them delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "corpus.txt"
REPO = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Nothing a test does touches the user's yi-local folder or Hugging Face cache."""
    home = tmp_path_factory.mktemp("yi-home")
    monkeypatch.setenv("YI_LOCAL_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The chat, base and legacy variants, built from the same seed (so the same weights)."""
    root = tmp_path_factory.mktemp("hf")
    return {v: build_checkpoint(root / f"Yi-Tiny-{v}", CORPUS, variant=v) for v in ("chat", "base", "legacy")}


@pytest.fixture(scope="session")
def chat_dir(checkpoints) -> Path:
    return checkpoints["chat"]


@pytest.fixture(scope="session")
def ggufs(chat_dir, tmp_path_factory) -> dict[str, Path]:
    """The chat checkpoint converted to each unquantized output type."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: convert(chat_dir, out=out, outtype=t).files[0] for t in ("f32", "f16", "bf16", "q8_0")}


@pytest.fixture(scope="session")
def chat_gguf(chat_dir, tmp_path_factory) -> Path:
    """The test model most runtime tests use: the chat checkpoint at Q8_0."""
    out = tmp_path_factory.mktemp("gguf-q8")
    return convert(chat_dir, out=out, quants=["Q8_0"]).files[0]


@pytest.fixture(scope="session")
def medium_dir(tmp_path_factory) -> Path:
    """A 100 MB chat checkpoint: slow enough that conversion, quantization and generation take a while."""
    dims = Dims(hidden=1024, ffn=2816, layers=4, heads=8, kv_heads=2, vocab=1024)
    return build_checkpoint(tmp_path_factory.mktemp("medium") / "Yi-Medium", CORPUS, variant="chat", dims=dims)


@pytest.fixture(scope="session")
def medium_gguf(medium_dir, tmp_path_factory) -> Path:
    return convert(medium_dir, out=tmp_path_factory.mktemp("gguf-medium"), quants=["Q8_0"]).files[0]


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A tiny Yi-shaped chat model TRAINED on yi_local/texts/calibration.txt: real activation outliers.

    Built once per machine (about a minute) and cached outside the test's temp dirs; see tests/trained.py.
    """
    pytest.importorskip("torch", reason="the trained model is trained with torch")
    import shutil

    from tests.trained import trained_checkpoint

    return Path(shutil.copytree(trained_checkpoint(), tmp_path_factory.mktemp("trained") / "Yi-Tiny-Trained"))


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real `yi-local` command in a subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "yi_local", *args],
        capture_output=True,
        text=kw.pop("text", True),
        timeout=timeout,
        cwd=kw.pop("cwd", REPO),
        env={**os.environ, **(env or {})},
        **kw,
    )
