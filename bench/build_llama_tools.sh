#!/usr/bin/env bash
# Build llama-bench and llama-perplexity from the pinned llama.cpp tree (the one llama-cpp-python
# 0.3.36 vendors, extracted by tools/setup.sh to .deps/llama.cpp), for bench/bench_evaluate.py.
# Idempotent: a stamp keyed by the source version and the flags skips a finished build.
#
#   bench/build_llama_tools.sh            -> .deps/llama.cpp-build/bin/{llama-bench,llama-perplexity}
#   LLMPIPE_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=70" bench/build_llama_tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${LLMPIPE_LLAMA_CPP_DIR:-$PWD/.deps/llama.cpp}
BUILD=${LLMPIPE_LLAMA_TOOLS_BUILD:-$PWD/.deps/llama.cpp-build}
# The same portable flags as the llama-cpp-python wheel (tools/setup.sh), so both run the same code.
FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF ${LLMPIPE_CMAKE_ARGS:-}"
TARGETS="llama-bench llama-perplexity"

if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "llama.cpp sources not found at $SRC (run tools/setup.sh first)" >&2
    exit 1
fi
stamp="$(cat "$SRC/.version" 2>/dev/null || echo unknown) $FLAGS $TARGETS"
if [ "$(cat "$BUILD/.stamp" 2>/dev/null)" = "$stamp" ] \
    && [ -x "$BUILD/bin/llama-bench" ] && [ -x "$BUILD/bin/llama-perplexity" ]; then
    echo "$BUILD/bin: up to date" >&2
    exit 0
fi
# shellcheck disable=SC2086  # FLAGS is a list of arguments
cmake -S "$SRC" -B "$BUILD" $FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
# shellcheck disable=SC2086
cmake --build "$BUILD" --target $TARGETS -j "$(nproc)" >&2
echo "$stamp" >"$BUILD/.stamp"
echo "$BUILD/bin: built $TARGETS" >&2
