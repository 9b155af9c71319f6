"""Bad input to convert, doctor, show and run, through the real CLI: exit 1, one message naming the problem,
no traceback, and nothing new in the output folder (inputs untouched).

The cases run concurrently in one fixture (each is a process start, about half a second) and are
then checked one test each.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPO, run_cli
from tests.synthetic import Dims, build_sparse_checkpoint


@dataclass
class Case:
    args: list[str]
    needles: list[str]
    out: Path | None = None  # must stay empty (or absent)
    unchanged: list[Path] = field(default_factory=list)  # inputs that must keep their bytes
    input: bytes | None = None


def _config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def _fsdecode(raw: bytes) -> str:
    """A command-line argument holding bytes that are not UTF-8 (Python passes them through)."""
    return os.fsdecode(raw)


def _cases(root: Path, chat_dir: Path, f16: Path) -> dict[str, Case]:
    def model(name: str, edit: Callable[[Path], object] | None = None) -> Path:
        copy = shutil.copytree(chat_dir, root / name / "Yi-Tiny-Chat")
        if edit:
            edit(copy)
        return copy

    def folder(name: str) -> Path:
        return root / name / "out"

    def gguf(name: str) -> Path:
        (root / name).mkdir(parents=True)
        return Path(shutil.copy(f16, root / name / "m-F16.gguf"))

    cases: dict[str, Case] = {}

    def add(name: str, args: list, needles: list[str], **kw) -> None:
        cases[name] = Case([str(a) for a in args], needles, **kw)

    # Every config field and value is checked in test_convert_validation; two go through the CLI here.
    for key, value, needle in [
        ("num_attention_heads", "4", 'num_attention_heads is "4", not a whole number'),
        ("num_attention_heads", 0, "num_attention_heads is 0; it must be positive"),
    ]:
        m = model(f"config-{key}-{value}", lambda d, k=key, v=value: _config(d, **{k: v}))
        add(f"config {key}={value!r}", ["convert", m, "-o", folder(f"config-{key}-{value}")],
            ["config.json", needle], out=folder(f"config-{key}-{value}"))  # fmt: skip

    m = model("config-dir", lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()))
    add("config.json is a folder", ["convert", m, "-o", folder("config-dir")], ["config.json is a folder"],
        out=folder("config-dir"))  # fmt: skip
    add("config.json given instead of its folder", ["convert", chat_dir / "config.json"],
        ["config.json is a file", f"give the folder that holds config.json: yi-local convert {chat_dir}"])  # fmt: skip

    add("-o /dev/null", ["convert", chat_dir, "-o", "/dev/null"], ["/dev/null is not a folder"])
    (root / "devnull").mkdir()
    (root / "devnull" / "m.gguf").symlink_to("/dev/null")
    add("-o a link to /dev/null", ["convert", chat_dir, "-o", root / "devnull" / "m.gguf", "--force"],
        ["m.gguf is not a regular file"])  # fmt: skip
    (root / "a-file").write_text("not a folder")
    add("-o under a regular file", ["convert", chat_dir, "-o", root / "a-file" / "out"],
        [f"{root / 'a-file'} is not a folder"], unchanged=[root / "a-file"])  # fmt: skip
    add("-o in a folder nobody may write", ["convert", chat_dir, "-o", "/sys/yi-local-test"],
        ["cannot write in /sys: permission denied"])  # fmt: skip
    (root / "folder.gguf").mkdir()
    add("-o a folder named .gguf", ["convert", chat_dir, "-o", root / "folder.gguf", "--outtype", "f16", "--force"],
        [f"{root / 'folder.gguf'} is a folder"])  # fmt: skip
    add("--threads 0", ["convert", chat_dir, "-o", folder("threads0"), "--threads", "0"], ["--threads is 0"],
        out=folder("threads0"))  # fmt: skip
    f = gguf("threads-neg")
    add("--threads -2 (quantizing a GGUF)", ["convert", f, "--q", "Q8_0", "--threads", "-2"], ["--threads is -2"])
    f = gguf("threads-huge")  # llama.cpp's quantizer died in std::terminate
    add("--threads 100000", ["convert", f, "--q", "Q8_0", "--threads", "100000"], ["--threads is 100000"])

    # The output is the input, --force or not.
    f = gguf("same")
    add("-o the input GGUF", ["convert", f, "--q", "Q4_K_M", "-o", f, "--force"], [f"{f} is the input {f}"],
        unchanged=[f])  # fmt: skip
    f = gguf("hardlink")
    os.link(f, f.with_name("link.gguf"))
    add("-o a hard link to the input", ["convert", f, "--q", "Q4_K_M", "-o", f.with_name("link.gguf"), "--force"],
        ["link.gguf is the input"], unchanged=[f])  # fmt: skip
    f = gguf("symlink")
    f.with_name("link.gguf").symlink_to(f)
    add("-o a symlink to the input", ["convert", f, "--q", "Q4_K_M", "-o", f.with_name("link.gguf"), "--force"],
        ["link.gguf is the input"], unchanged=[f])  # fmt: skip
    m = model("shard")
    shard = m / "model-00001-of-00002.safetensors"
    (root / "shard" / "out.gguf").symlink_to(shard)
    add("-o a link to a source shard", ["convert", m, "--q", "Q8_0", "-o", root / "shard" / "out.gguf", "--force"],
        ["out.gguf is the input", "model-00001-of-00002.safetensors"], unchanged=[shard])  # fmt: skip

    # Free space, checked before anything is written: a model that needs more than the disk has.
    free = shutil.disk_usage(root).free
    dims = Dims(hidden=65536, ffn=65536, layers=1, heads=512, kv_heads=512, vocab=1024)
    per_layer = 7 * 65536 * 65536 * 2
    giant = build_sparse_checkpoint(root / "giant" / "Yi-Giant", chat_dir,
                                    Dims(**{**dims.__dict__, "layers": min(512, free // per_layer + 2)}))  # fmt: skip
    add("not enough free space", ["convert", giant, "-o", folder("giant"), "--q", "Q4_K_M"],
        [f"not enough free space in {folder('giant')}", "GiB are free"], out=folder("giant"))  # fmt: skip

    for value in ("nan", "-1"):
        add(f"doctor --memory {value}", ["doctor", "--memory", value], [f"--memory is {value}"])
    add("doctor --ctx 0", ["doctor", "--ctx", "0"], ["--ctx is 0"])
    for value in ("nan", "0", "inf"):
        add(f"doctor --bandwidth {value}", ["doctor", "--bandwidth", value], [f"--bandwidth is {value}"])

    # Bytes that are not UTF-8 in arguments and on standard input.
    add("run a non-UTF-8 prompt", ["run", f16, _fsdecode(b"hi \xff there"), "--max-tokens", "2", "--ctx", "64"],
        ["has bytes that are not UTF-8 (b'\\xff')"])  # fmt: skip
    add("run with non-UTF-8 standard input", ["run", f16, "--max-tokens", "2", "--ctx", "64"],
        ["standard input is not UTF-8 text (byte 3 is b'\\xff')"], input=b"hi \xff there")  # fmt: skip
    return cases


def _run(case: Case) -> subprocess.CompletedProcess:
    if case.input is None:
        return run_cli(*case.args, timeout=120)
    # Bytes on standard input: run_cli speaks text.
    proc = subprocess.run([sys.executable, "-m", "yi_local", *case.args], input=case.input, capture_output=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))  # fmt: skip


@pytest.fixture(scope="module")
def results(chat_dir, ggufs, tmp_path_factory) -> dict[str, tuple[Case, subprocess.CompletedProcess, dict]]:
    cases = _cases(tmp_path_factory.mktemp("cli-errors"), chat_dir, ggufs["f16"])
    before = {name: {p: p.read_bytes() for p in case.unchanged} for name, case in cases.items()}
    with ThreadPoolExecutor(4) as pool:
        procs = dict(zip(cases, pool.map(_run, cases.values())))
    return {name: (cases[name], procs[name], before[name]) for name in cases}


CASE_NAMES = [
    "config num_attention_heads='4'", "config num_attention_heads=0",
    "config.json is a folder", "config.json given instead of its folder", "-o /dev/null", "-o a link to /dev/null",
    "-o under a regular file", "-o in a folder nobody may write", "-o a folder named .gguf", "--threads 0",
    "--threads -2 (quantizing a GGUF)", "--threads 100000", "-o the input GGUF", "-o a hard link to the input", "-o a symlink to the input",
    "-o a link to a source shard", "not enough free space", "doctor --memory nan", "doctor --memory -1",
    "doctor --ctx 0", "doctor --bandwidth nan", "doctor --bandwidth 0", "doctor --bandwidth inf",
    "run a non-UTF-8 prompt", "run with non-UTF-8 standard input",
]  # fmt: skip


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_fails_cleanly(results, name):
    case, proc, before = results[name]
    stderr = proc.stderr
    assert proc.returncode == 1, (proc.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr
    assert "\nerror: " in "\n" + stderr, stderr
    for needle in case.needles:
        assert needle in stderr, stderr
    if case.out is not None:
        assert not case.out.exists() or list(case.out.iterdir()) == []
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was changed"
    for path in {p.parent for p in before} | ({case.out.parent} if case.out and case.out.parent.is_dir() else set()):
        assert not [p.name for p in path.iterdir() if p.name.startswith(".")], "a temporary was left behind"


def test_every_case_is_checked(results):
    assert sorted(results) == sorted(CASE_NAMES)


def test_paths_that_are_not_utf8_convert(chat_dir, tmp_path):
    """File names may hold any bytes: the model's name gets a replacement character, llama.cpp gets the bytes,
    and the path is printed back even where standard output is strict UTF-8."""
    src = Path(_fsdecode(bytes(tmp_path) + b"/Yi-\xff"))
    shutil.copytree(chat_dir, src)
    out = Path(_fsdecode(bytes(tmp_path) + b"/out\xfe"))
    proc = run_cli("convert", str(src), "-o", str(out), "--q", "Q8_0", env={"PYTHONIOENCODING": "utf-8"},
                   errors="surrogateescape")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["Yi-\ufffd-Q8_0.gguf"]
    assert f"wrote {out}/Yi-\ufffd-Q8_0.gguf" in proc.stdout


def test_a_full_disk_while_quantizing_is_named(ggufs, tmp_path):
    """llama.cpp only says it failed: the message must blame the disk (here a 1 MB file size limit), not the model."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    out = tmp_path / "out"
    proc = run_cli("convert", str(ggufs["f16"]), "--q", "Q8_0", "-o", str(out), preexec_fn=limit_file_size)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "file size limit" in proc.stderr and "unusual tensor shapes" not in proc.stderr, proc.stderr
    assert not out.exists() or list(out.iterdir()) == []
