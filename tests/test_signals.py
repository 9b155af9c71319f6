"""SIGTERM and SIGHUP end a conversion like Ctrl+C; temporaries are private, locked, and cleaned up after dead runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from yi_local import signals
from yi_local.atomic import TEMP_DIR_SUFFIX, TEMP_SUFFIX, remove_stale, write_atomic

TEMPS = (TEMP_SUFFIX, TEMP_DIR_SUFFIX)


def start_convert(src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "yi_local", "convert", str(src), "-o", str(out), "--threads", "1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


def wait_for(proc: subprocess.Popen, out: Path, suffix: str) -> Path:
    """The first temporary in `out` whose name ends with `suffix`, while `proc` still runs."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in out.iterdir() if p.name.endswith(suffix)] if out.exists() else []
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no {suffix} appeared before the conversion ended: {proc.communicate()}")


@pytest.mark.parametrize(
    "sig, args, temp",
    [
        (signal.SIGTERM, ["--outtype", "q8_0"], "Q8_0.gguf"),  # while numpy writes the GGUF
        (signal.SIGHUP, ["--q", "Q4_K_M"], "Q4_K_M.gguf"),  # while llama.cpp quantizes
    ],
)
def test_signal_mid_write_leaves_nothing(medium_dir, tmp_path, sig, args, temp):
    out = tmp_path / "out"
    proc = start_convert(medium_dir, out, *args)
    found = wait_for(proc, out, TEMP_DIR_SUFFIX if "--q" in args else TEMP_SUFFIX)
    assert temp in found.name
    if found.is_dir():  # llama.cpp writes inside a folder only this user can enter
        assert found.stat().st_mode & 0o777 == 0o700
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_temporaries_of_a_killed_run_are_removed_by_the_next(medium_dir, chat_dir, tmp_path):
    out = tmp_path / "out"
    proc = start_convert(medium_dir, out, "--q", "Q4_K_M")
    wait_for(proc, out, TEMP_DIR_SUFFIX)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.communicate(timeout=60)
    left = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(TEMP_SUFFIX) for n in left) and any(n.endswith(TEMP_DIR_SUFFIX) for n in left)
    proc = run_cli("convert", str(chat_dir), "-o", str(out), "--q", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == [f"{chat_dir.name}-Q8_0.gguf"]


HOLD = """
import sys, time
from pathlib import Path
from yi_local.atomic import atomic_output
with atomic_output(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_live_runs_temporary_is_kept_until_it_dies(tmp_path):
    """The lock, not a pid, tells a live run's temporary from a dead one's."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "model.gguf")], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)  # fmt: skip
    tmp = Path(holder.stdout.readline().strip())
    try:
        remove_stale(tmp_path)
        write_atomic(tmp_path / "other.json", "{}")  # another write in the same folder
        assert tmp.read_bytes() == b"half"
    finally:
        holder.kill()
        holder.wait()
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_temporaries_are_not_followed_through_links(tmp_path):
    """A link planted at the output is replaced, never written through; temporaries are new files."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out.json").symlink_to(victim)
    write_atomic(tmp_path / "out.json", "new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "new"
    assert oct((tmp_path / "out.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_ignored_sighup_stays_ignored():
    """Under `nohup` SIGHUP is ignored, and yi-local leaves it so."""
    before = {s: signal.getsignal(s) for s in signals.HANDLED}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signals.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert signals.exit_code(e.value) == 143
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_refused_rerun_still_removes_a_killed_runs_temporaries(medium_dir, tmp_path):
    """After a SIGKILL, the rerun without --force is refused (an output is there) but cleans up anyway."""
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{medium_dir.name}-Q4_K_M.gguf").write_bytes(b"an earlier result")
    proc = start_convert(medium_dir, out, "--q", "Q8_0", "--q", "Q4_K_M", "--force")
    wait_for(proc, out, TEMP_SUFFIX)
    proc.kill()
    proc.communicate(timeout=60)
    assert any(p.name.endswith(TEMP_SUFFIX) for p in out.iterdir())
    proc = run_cli("convert", str(medium_dir), "-o", str(out), "--q", "Q4_K_M")
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert not any(p.name.endswith((TEMP_SUFFIX, TEMP_DIR_SUFFIX)) for p in out.iterdir())
