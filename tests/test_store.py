"""pull → store → list → show → run → rm against a local server speaking the hub protocol; resume,
corruption, tokens, a hub that is down, offline use, and no network at all for stored models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli
from tests.hub_server import Hub, HubServer
from tui.app import ChatApp
from tui.session import Session, Settings
from yi_local import store
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend
from yi_local.units import format_size

REPO_ID = "01-ai/Yi-Tiny-Chat"
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def hub(chat_dir):
    h = Hub()
    h.add_folder(REPO_ID, chat_dir)
    h.add_folder("01-ai/Yi-6B-Chat", chat_dir)  # the catalog's yi:6b-chat, served with the tiny weights
    with HubServer(h) as server:
        yield server


def online(server) -> dict:
    return {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def greedy_reply(gguf, prompt: str, n: int = 6) -> str:
    backend = load_backend(str(gguf), LoadOptions(n_ctx=256, n_threads=2))
    events = backend.generate(backend.chat_tokens([{"role": "user", "content": prompt}]),
                              SamplingParams(max_tokens=n, temperature=0))  # fmt: skip
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def requests_for(server, name: str) -> list[tuple[str, str, dict]]:
    return [r for r in server.hub.log if r[1].endswith("/" + name)]


def test_pull_list_show_run_rm(hub, chat_dir):
    proc = run_cli("pull", f"{REPO_ID}:q8_0", env=online(hub))
    assert proc.returncode == 0, proc.stderr
    [model] = store.list_models()
    assert (model.repo, model.quant, model.revision) == (REPO_ID, "Q8_0", hub.hub.repos[REPO_ID].commit)
    assert model.sha256 == store.sha256_file(model.path) and model.chat and model.context == 4096
    assert f"pulled {REPO_ID}:q8_0: {model.path} ({format_size(model.size)})" in proc.stdout
    assert "removed the downloaded weights, freeing" in proc.stdout
    assert not (store.models_dir().parent / "downloads" / "01-ai--Yi-Tiny-Chat").exists()
    # Only what conversion needs was fetched.
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub.hub.log if r[0] == "GET" and "/resolve/" in r[1]}
    assert "README.md" not in fetched and {SHARD, "tokenizer.model", "config.json"} <= fetched

    listing = run_cli("list")
    assert listing.returncode == 0 and REPO_ID in listing.stdout and "Q8_0" in listing.stdout
    assert str(model.path) in listing.stdout and "4,096" in listing.stdout

    shown = run_cli("show", f"{REPO_ID}:q8_0")
    assert shown.returncode == 0, shown.stderr
    for needle in ("architecture   llama", "quantization   Q8_0", "eos token      <|im_end|> (7)",
                   "eot token      <|im_end|> (7)", "<|im_start|>", f"revision       {model.revision}"):  # fmt: skip
        assert needle in shown.stdout, shown.stdout

    ran = run_cli("run", f"{REPO_ID}:q8_0", "Hello", "--temperature", "0", "--max-tokens", "6", "--ctx", "256")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == greedy_reply(model.path, "Hello") + "\n"

    refused = run_cli("rm", REPO_ID)  # no terminal to ask on
    assert refused.returncode == 1 and "--yes" in refused.stderr and model.path.exists()
    removed = run_cli("rm", REPO_ID, "--yes")
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert store.list_models() == [] and not model.path.exists()
    assert "no models" in run_cli("list").stdout


def test_a_present_model_makes_no_request(hub):
    assert run_cli("pull", REPO_ID, env=online(hub)).returncode == 0
    before = len(hub.hub.log)
    again = run_cli("pull", REPO_ID, env=online(hub))
    assert again.returncode == 0 and "already in the store" in again.stdout
    assert run_cli("run", REPO_ID, "hi", "--max-tokens", "2", env=online(hub)).returncode == 0
    assert len(hub.hub.log) == before


def test_cut_download_resumes_byte_identical(hub, medium_dir):
    """A transfer cut half-way through a 50 MB shard goes on from where it stopped (a Range request)."""
    hub.hub.add_folder("01-ai/Yi-Medium", medium_dir)
    size = (medium_dir / SHARD).stat().st_size
    assert size > 40 << 20  # huggingface-hub writes 10 MB chunks: a cut must come after some of them
    hub.hub.cut_after[SHARD] = size // 2
    proc = run_cli("pull", "01-ai/Yi-Medium:q4_0", "--keep-source", env=online(hub))
    assert proc.returncode == 0, proc.stderr
    ranges = [h.get("Range") or h.get("range") for m, _, h in requests_for(hub, SHARD) if m == "GET"]
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1][6:].rstrip("-")) > 0, ranges
    kept = store.models_dir().parent / "downloads" / "01-ai--Yi-Medium"
    assert f"kept the downloaded weights in {kept}" in proc.stdout
    assert (kept / SHARD).read_bytes() == (medium_dir / SHARD).read_bytes()


def test_corrupt_download_is_detected(hub):
    hub.hub.corrupt.add(SHARD)
    proc = run_cli("pull", REPO_ID, "--keep-source", env=online(hub))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "corrupt" in proc.stderr and SHARD in proc.stderr and "pull` again" in proc.stderr
    assert store.list_models() == []
    assert not (store.models_dir().parent / "downloads" / "01-ai--Yi-Tiny-Chat" / SHARD).exists()
    hub.hub.corrupt.clear()
    assert run_cli("pull", REPO_ID, env=online(hub)).returncode == 0  # fetched anew, and fine


def test_private_repo_needs_hf_token(hub, chat_dir):
    hub.hub.add_folder("01-ai/Yi-Private", chat_dir, token="hf_secret")
    denied = run_cli("pull", "01-ai/Yi-Private", env=online(hub))
    assert denied.returncode == 1 and "HF_TOKEN" in denied.stderr and "Traceback" not in denied.stderr
    allowed = run_cli("pull", "01-ai/Yi-Private", env={**online(hub), "HF_TOKEN": "hf_secret"})
    assert allowed.returncode == 0, allowed.stderr


def test_hub_down_gives_a_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    proc = run_cli("pull", "yi:6b-chat", env={"HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "could not download 01-ai/Yi-6B-Chat" in proc.stderr and "HF_ENDPOINT" in proc.stderr


def test_offline_mode(hub):
    missing = run_cli("run", "yi:6b-chat", "hi", "--pull", env={"HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr
    asked = run_cli("run", "yi:6b-chat", "hi")
    assert asked.returncode == 1 and "yi-local pull yi:6b-chat:q4_k_m" in asked.stderr and "--pull" in asked.stderr
    assert run_cli("pull", "yi:6b-chat", env=online(hub)).returncode == 0
    ok = run_cli("run", "yi:6b-chat", "hi", "--max-tokens", "3", env={"HF_HUB_OFFLINE": "1"})
    assert ok.returncode == 0, ok.stderr


def test_run_with_pull_fetches_a_catalog_model(hub):
    proc = run_cli("run", "yi:6b-chat:q4_0", "Hello", "--pull", "--temperature", "0", "--max-tokens", "4",
                   env=online(hub))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [model] = store.list_models()
    assert (model.name, model.quant, model.path.name) == ("yi:6b-chat", "Q4_0", "Yi-6B-Chat-Q4_0.gguf")
    assert proc.stdout == greedy_reply(model.path, "Hello", 4) + "\n"


def test_convert_from_the_hub(hub, tmp_path):
    proc = run_cli("convert", REPO_ID, "--q", "q4_0", "-o", str(tmp_path), env=online(hub))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "Yi-Tiny-Chat-Q4_0.gguf").is_file() and "freeing" in proc.stdout


def test_local_folder_is_converted_once(chat_dir):
    first = run_cli("run", str(chat_dir), "hi", "--max-tokens", "2")
    assert first.returncode == 0, first.stderr
    [model] = store.list_models()
    assert model.repo == f"local/{chat_dir.name}" and model.quant == "Q4_K_M"
    stamp = model.path.stat().st_mtime_ns
    assert run_cli("run", str(chat_dir), "hi", "--max-tokens", "2").returncode == 0
    assert store.list_models()[0].path.stat().st_mtime_ns == stamp


def test_list_never_shows_a_half_written_model(hub):
    folder = store.model_folder(REPO_ID)
    folder.mkdir(parents=True)
    (folder / ".Yi-Tiny-Chat-Q4_K_M.gguf.123.part").write_bytes(b"GGUF half")
    (folder / "Yi-Tiny-Chat-Q8_0.gguf").write_bytes(b"GGUF not in the manifest")
    assert store.list_models() == []
    (folder / "manifest.json").write_text('{"repo": "x", "files": {"Q4_0": {"file": "gone.gguf"}}}')
    assert store.list_models() == []


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails and is recorded: anything that reaches for the network shows up."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


BLOCKED_RUN = """
import socket, sys
attempts = []
def refuse(self, address, *args):
    attempts.append(address)
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
from yi_local.cli import main
code = main(sys.argv[1:])
print("ATTEMPTS", len(attempts), file=sys.stderr)
sys.exit(code)
"""


def test_stored_model_runs_and_chats_with_the_network_blocked(hub, no_network):
    assert run_cli("pull", REPO_ID, env=online(hub)).returncode == 0
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "run", REPO_ID, "hi", "--max-tokens", "3"],
                          capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ATTEMPTS 0" in proc.stderr


async def test_chat_on_a_stored_model_with_the_network_blocked(hub, no_network):
    proc = run_cli("pull", REPO_ID, env=online(hub))  # runs in a subprocess: unaffected by the fixture
    assert proc.returncode == 0, proc.stderr
    from yi_local.resolve import resolve_gguf

    app = ChatApp(lambda progress: load_backend(str(resolve_gguf(REPO_ID)), LoadOptions(n_ctx=256, n_threads=2)),
                  session=Session(settings=Settings(temperature=0, max_tokens=4)))  # fmt: skip
    async with app.run_test(size=(80, 24)) as pilot:
        from tests.test_tui import ready, type_and_send, wait_until

        await ready(pilot)
        assert app.backend is not None
        await type_and_send(pilot, "hi")
        await wait_until(pilot, lambda: len(app.session.messages) == 2 and not app.generating)
    assert no_network == []


def test_doctor_prints_a_sane_table():
    proc = run_cli("doctor", "--memory", "16", "--bandwidth", "20")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("OS", "CPU", "RAM", "llama.cpp", "Q4_K_M", "yi:34b-chat", "yi-coder:1.5b-chat", "Recommended:"):
        assert needle in out
    assert "bandwidth  20 GB/s (--bandwidth)" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("yi:6b-chat "))
    # Yi-6B-Chat at Q4_K_M: about 4 GB, as the Yi README says; 20 GB/s ÷ 3.78 GB read a token.
    assert "4.0 5.3/s ~" in row
    row34 = next(line for line in out.splitlines() if line.strip().startswith("yi:34b-chat "))
    assert "20.6 0.9/s ✗" in row34  # about 20 GB: not in 16 GiB
    # 16 GiB x 0.9 headroom: yi-1.5:9b-chat fits at Q8_0 (9.4 GiB) but would decode at 2.1 tok/s; the
    # biggest chat model at 10 tok/s or more is Yi-Coder-1.5B-Chat at Q6_K.
    row9 = next(line for line in out.splitlines() if line.strip().startswith("yi-1.5:9b-chat "))
    assert row9.rstrip().endswith("9.4 2.1/s ~")
    assert "Recommended: yi-coder:1.5b-chat:q6_k (2.2 GiB, ~10 tok/s)" in out


def test_doctor_measures_the_bandwidth_when_not_told():
    proc = run_cli("doctor", "--memory", "16")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("bandwidth"))
    assert "measured: llama.cpp's Q4_K kernel reads " in line, line  # a CPU build here
    assert "Speed ≈ memory bandwidth ÷ bytes read per token" in proc.stdout


def test_manifest_records_how_the_model_was_made(hub):
    assert run_cli("pull", f"{REPO_ID}:q5_k_m", env=online(hub)).returncode == 0
    manifest = json.loads((store.model_folder(REPO_ID) / "manifest.json").read_text())
    assert manifest["repo"] == REPO_ID and manifest["revision"] == hub.hub.repos[REPO_ID].commit
    entry = manifest["files"]["Q5_K_M"]
    assert entry["options"]["quant"] == "Q5_K_M" and len(entry["sha256"]) == 64
    assert manifest["yi_local_version"]
