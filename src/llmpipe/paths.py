"""Where the project's own built dependencies live (see tools/setup.sh)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# `make setup` extracts the pinned llama-cpp-python sdist's llama.cpp tree here; the official
# converter (convert_hf_to_gguf.py, conversion/, gguf-py/) is used from this very tree so that
# converter and runtime always come from the same pinned source.
LLAMA_CPP_DIR = Path(os.environ.get("LLMPIPE_LLAMA_CPP_DIR", REPO_ROOT / ".deps" / "llama.cpp"))

# `make setup` builds the pinned llama.cpp once (tools/build_llama_cpp.sh): its shared libraries,
# which llama-cpp-python loads, and llama.cpp's own tools, side by side in one folder.
LLAMA_BIN_DIR = Path(
    os.environ.get("LLMPIPE_LLAMA_BIN_DIR", REPO_ROOT / ".deps" / "llama.cpp-bin" / "bin")
)


def llama_tool(name: str) -> Path:
    """The path of one of llama.cpp's tools from the pinned build (e.g. ``llama-imatrix``)."""
    from llmpipe.errors import PipelineError

    tool = LLAMA_BIN_DIR / name
    if not os.access(tool, os.X_OK):
        raise PipelineError(
            f"llama.cpp tool {name} not found at {tool} (run `make setup`, which builds the "
            f"pinned llama.cpp's tools; or set LLMPIPE_LLAMA_BIN_DIR to a build of the same "
            f"version)"
        )
    return tool


def llama_build_flags() -> str | None:
    """The CMake flags the pinned llama.cpp was built with (None when unknown)."""
    try:
        return (LLAMA_BIN_DIR.parent / "FLAGS").read_text().strip()
    except OSError:
        return None
