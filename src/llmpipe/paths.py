"""Where the project's own built dependencies live (see tools/setup.sh)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# `make setup` extracts the pinned llama-cpp-python sdist's llama.cpp tree here; the official
# converter (convert_hf_to_gguf.py, conversion/, gguf-py/) is used from this very tree so that
# converter and runtime always come from the same pinned source.
LLAMA_CPP_DIR = Path(os.environ.get("LLMPIPE_LLAMA_CPP_DIR", REPO_ROOT / ".deps" / "llama.cpp"))
