#!/usr/bin/env bash
# Build the pinned llama.cpp once: the shared libraries that llama-cpp-python loads and
# llama.cpp's own tools, from one CMake tree, so the Python binding, the tools and the converter
# (all from the same llama-cpp-python sdist) always agree. Called by tools/setup.sh.
#
#   tools/build_llama_cpp.sh <llama.cpp source tree> <output dir> <extra cmake flags...>
#
# <output dir>/bin receives the tools and the libraries (lib*.so*) side by side; every binary
# finds its libraries through RUNPATH=$ORIGIN, so the folder can be copied anywhere.
set -euo pipefail
SRC=$1
OUT=$2
shift 2
BUILD=$OUT.build
# The tools the workflow and the benchmarks run: quantization with an importance matrix, the
# server lm-evaluation-harness talks to, one model over several hosts (RPC), batched decoding
# and the reference benchmarks. The libraries (llama, ggml*) are built as their dependencies.
TARGETS="llama llama-quantize llama-imatrix llama-perplexity llama-bench llama-batched-bench
llama-server ggml-rpc-server"

# An interrupted build's tree is kept and resumed (configure with the same flags is incremental).
rm -rf "$OUT.tmp"
# shellcheck disable=SC2086,SC2068  # the flags are a list of arguments
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
    "$@" >&2
# shellcheck disable=SC2086
cmake --build "$BUILD" --target $TARGETS -j "$(nproc)" >&2
mkdir -p "$OUT.tmp/bin"
# Tools and libraries (with their version symlinks) into one relocatable folder.
for tool in $TARGETS; do
    [ -x "$BUILD/bin/$tool" ] && cp -a "$BUILD/bin/$tool" "$OUT.tmp/bin/"
done
find "$BUILD" -name 'lib*.so*' \( -type f -o -type l \) -exec cp -a {} "$OUT.tmp/bin/" \;
# rpc-server is the name llama.cpp's documentation and users know (target ggml-rpc-server).
[ -x "$OUT.tmp/bin/ggml-rpc-server" ] && ln -s ggml-rpc-server "$OUT.tmp/bin/rpc-server"
for tool in llama-quantize llama-imatrix llama-server rpc-server; do
    if [ ! -x "$OUT.tmp/bin/$tool" ]; then
        echo "build_llama_cpp: $tool was not built (see the CMake output above)" >&2
        exit 1
    fi
done
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
rm -rf "$BUILD"
