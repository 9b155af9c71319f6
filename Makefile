# yi-local: `make demo` runs the whole pipeline offline on a tiny model; `make test` runs the tests.
# Both install what is missing first (a .venv in the repo), so each works alone on a fresh clone.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# llama-cpp-python builds from source; pip caches the wheel, so only the first install is slow.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# ggml's AMX kernels die with SIGILL on some x86-64 virtual machines whose CPUs report AMX (seen on a
# Sapphire Rapids VM: the first llama_decode of a Q8_0 model). Build without them on x86-64; other
# kernels (AVX-512, repacking) are kept. A GPU build adds its flags through CMAKE_ARGS as usual.
ifneq ($(filter x86_64 amd64 AMD64,$(shell uname -m)),)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS := $(CMAKE_ARGS) -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif
# llama.cpp's RPC backend (`yi-local worker`, `--rpc`): libggml-rpc beside the other libraries.
export CMAKE_ARGS := $(CMAKE_ARGS) -DGGML_RPC=ON
LLAMA_LIB = $(VENV)/lib/python*/site-packages/llama_cpp/lib

.PHONY: install test demo bench lint test-snapshot-update clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) is only for the tests that compare with transformers; the GGUF path never needs it.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' torch==2.13.0
	# pip's wheel cache ignores CMAKE_ARGS: a wheel cached from an AMX build, or from one without the RPC
	# backend, is removed and rebuilt; a build that still lacks either fails here, not in a test.
	if { [ -n "$(NO_AMX)" ] && grep -q ggml_backend_amx_buffer_type $(LLAMA_LIB)/libggml-cpu.so*; } \
			|| ! ls $(LLAMA_LIB)/libggml-rpc.* >/dev/null 2>&1; then \
		$(PY) -m pip cache remove llama_cpp_python; \
		$(PY) -m pip install -q -c constraints.txt --force-reinstall --no-deps --no-cache-dir llama-cpp-python; \
		ls $(LLAMA_LIB)/libggml-rpc.* >/dev/null || { echo "llama-cpp-python was built without libggml-rpc" >&2; exit 1; }; \
	fi
	touch $(STAMP)

test: install
	$(PY) -m pytest tests

demo: install
	$(PY) -m tests.demo

# Benchmarks synthesize Yi-6B-shaped models into bench/out (about 9 GB) and build llama.cpp's own
# tools from the pinned llama-cpp-python sdist into .cache/ for the same-run baselines.
# The benchmarks build their models with the tests' synthetic checkpoints (tests/, not in the wheel).
bench: export PYTHONPATH := $(CURDIR)
bench: install
	$(PY) bench/convert.py
	$(PY) bench/decode.py
	$(PY) bench/chat_ttft.py
	$(PY) bench/chat_speed.py
	$(PY) bench/server.py
	$(PY) bench/quality.py --chunks 16 --quality-chunks 8
	$(PY) bench/long_context.py
	$(PY) bench/rpc.py

lint: install
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check yi_local converters tui tests bench

test-snapshot-update: install
	$(PY) -m pytest tests -k snapshot --snapshot-update

clean:
	rm -rf $(VENV) .pytest_cache demo-out bench/out
