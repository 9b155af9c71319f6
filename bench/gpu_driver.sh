#!/usr/bin/env bash
# GPU check for issue 6, following ../shared/docs/gpu-checks.md: on a CUDA machine with no internet,
# build llama.cpp (and llama-cpp-python's library) with CUDA from the pinned sdist, then run bench/gpu.py.
#
# Beforehand, where pip works (files land in ignored folders that travel with the working tree):
#   bash bench/gpu_driver.sh prepare      # sdist repacked without docs/models (~9 MB) + pure-Python wheels
# On the GPU machine (the device tool's `run`, carrying .gpu):
#   bash bench/gpu_driver.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
VER=$(.venv/bin/python -c "from importlib.metadata import version; print(version('llama-cpp-python'))" 2>/dev/null || echo 0.3.36)
PREP=.gpu

if [ "${1:-}" = prepare ]; then
    mkdir -p $PREP/wheels
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d $PREP
    tar xzf $PREP/llama_cpp_python-$VER.tar.gz -C $PREP
    rm -rf $PREP/llama_cpp_python-$VER/vendor/llama.cpp/{models,docs,benches,media,tools/ui,tools/server/public*}
    tar czf $PREP/src.tgz -C $PREP llama_cpp_python-$VER && rm -rf $PREP/llama_cpp_python-$VER $PREP/*.tar.gz
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d $PREP/wheels diskcache gguf sse-starlette fastapi starlette uvicorn platformdirs psutil rich \
        textual pydantic pydantic-core annotated-types typing-inspection anyio sniffio h11 markdown-it-py \
        mdurl pygments linkify-it-py uc-micro-py typing-extensions jinja2 markupsafe pyyaml \
        $(.venv/bin/pip freeze | grep -iE '^(transformers|tokenizers|safetensors|huggingface[-_]hub|sentencepiece|protobuf)==')
    echo "prepared $PREP ($(du -sh $PREP | cut -f1)); carry it with the device tool"
    exit 0
fi

set -x
tar xzf $PREP/src.tgz -C /tmp
SRC=/tmp/llama_cpp_python-$VER
cmake -S $SRC/vendor/llama.cpp -B /tmp/llama-cuda -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_FA=OFF >/dev/null
cmake --build /tmp/llama-cuda -j "$(nproc)" --target llama llama-bench llama-quantize >/dev/null
python3 -m pip install -q --no-index --no-deps --target /tmp/site $PREP/wheels/*.whl
export PYTHONPATH=/tmp/site:$SRC:$PWD LLAMA_CPP_LIB_PATH=/tmp/llama-cuda/bin PYTHONUNBUFFERED=1
python3 bench/gpu.py --llama-bench /tmp/llama-cuda/bin/llama-bench --out /tmp/gpu-out "$@" 2>&1 | tee ${OUT:-/tmp}/gpu.log
