"""Shared benchmark helpers: llama.cpp's own tools for same-run baselines, timing with peak RSS.

llama.cpp's sources come from the pinned llama-cpp-python sdist (`vendor/llama.cpp`), unpacked and
built under the ignored `.cache/` folder; nothing of them is committed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
OUT = REPO / "bench" / "out"
CORPUS = REPO / "tests" / "data" / "corpus.txt"
TOOLS = ("llama-quantize", "llama-bench", "llama-server", "llama-perplexity", "llama-imatrix")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def llama_cpp_source() -> Path:
    ver = version("llama-cpp-python")
    src = CACHE / f"llama_cpp_python-{ver}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        CACHE.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(CACHE)], check=True)  # fmt: skip
        subprocess.run(["tar", "xzf", str(CACHE / f"llama_cpp_python-{ver}.tar.gz"), "-C", str(CACHE)], check=True)
    return src / "vendor" / "llama.cpp"


def llama_tool(name: str) -> Path:
    """Path of a llama.cpp tool built from the same sources as the installed llama-cpp-python."""
    build = CACHE / "llama-build"
    exe = build / "bin" / name
    if not exe.is_file():
        src = llama_cpp_source()
        print(f"building llama.cpp's {', '.join(TOOLS)} in {build} (a few minutes, once)", flush=True)
        # The same flags as llama-cpp-python's build in the Makefile: no AMX kernels on x86-64 (they die
        # with SIGILL on some virtual machines), so the baseline runs the same kernels as yi-local.
        no_amx = ["-DCMAKE_C_FLAGS=" + NO_AMX, "-DCMAKE_CXX_FLAGS=" + NO_AMX] if platform.machine() in ("x86_64", "AMD64") else []
        # llama-server's web page would come from npm or a download; it is left out (the API is what is measured).
        no_ui = ["-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON", *no_ui, *no_amx],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return exe


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    stdout: str


def measure(cmd: list[str], env: dict | None = None, keep_output: bool = True) -> Measured:
    """Run `cmd`, returning its wall time and peak resident memory (from wait4's rusage)."""
    import tempfile

    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f if keep_output else subprocess.DEVNULL, stderr=err_f,
                                env={**os.environ, **(env or {})})  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it ourselves: the child's own rusage
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out = out_f.read().decode(errors="replace")
        err = err_f.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return Measured(seconds, usage.ru_maxrss / 1024, out)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    import platform

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()} · {cpu or platform.machine()} · {os.cpu_count()} cores"


class OtherLoad:
    """CPU time other processes took meanwhile (this VM's tests, another benchmark): the machine's busy
    time less this process's and its children's, living (a supervised model process, RPC workers) or
    reaped (llama-bench)."""

    def __init__(self) -> None:
        self.start = self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def _ours(self) -> float:
        import psutil

        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:  # the workers are children too
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def core_seconds(self) -> float:
        return max(0.0, (self._busy() - self.start[0]) - (self._ours() - self.start[1]))
