"""Catalogue faults only the real workflow shows (docs/faults.md, tests/unit/test_faults.py)."""

from __future__ import annotations

import pytest
from helpers import make_workdir, snakemake

from llmpipe.errors import ConfigError

fault = pytest.mark.fault
pytestmark = pytest.mark.workflow


@fault("an empty prompts file", "has no prompts")
def test_empty_prompts(tmp_path):
    workdir = make_workdir(tmp_path / "w")
    (workdir / "config" / "prompts.txt").write_text("\n  \n")
    done = snakemake(workdir, "-n", check=False)
    assert done.returncode != 0 and "has no prompts" in done.stdout + done.stderr


@fault("a prompt longer than the context", "prompt 1 has … tokens, more than …n_ctx=256 allows")
def test_prompt_longer_than_context(smollm2_gguf):
    from llmpipe.evaluation.llama_backend import LlamaSettings, generate, load
    from llmpipe.evaluation.records import Sampling

    llm = load(str(smollm2_gguf("Q4_K_M")), LlamaSettings.from_config({"n_ctx": 64}, threads=2))
    # llama.cpp rounds the context up to a multiple of 256
    with pytest.raises(ConfigError, match=r"prompt 1 has \d+ tokens, more than .*n_ctx=256"):
        generate(llm, [(0, "word " * 600)], Sampling(max_new_tokens=4))
