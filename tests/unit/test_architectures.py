"""llmpipe.architectures: what the pinned llama.cpp can take, decided from config.json."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from llmpipe import architectures as arch
from llmpipe.fetch import check_hf_folder, fetch_model, needs_remote_code

FIXTURES = REPO / "tests" / "fixtures" / "model_configs"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def registered():
    return arch.registered_architectures()


def test_the_converter_registry_is_read_from_the_vendored_source(registered):
    assert {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "FalconForCausalLM",
        "RWForCausalLM",
    } <= registered
    assert len(registered) > 100
    assert arch.registered_architectures(REPO / "no-such-dir") == frozenset()


@pytest.mark.parametrize(
    "name",
    [
        "llama-2-7b",
        "llama-2-13b",
        "mistral-7b-v0.1",
        "falcon-7b",
        "falcon-7b-refinedwebmodel",
        "falcon-40b",
        "smollm2-135m",
    ],
)
def test_the_cluster_models_are_convertible(name, registered):
    assert arch.gguf_support(fixture(name), registered) == arch.GgufSupport(True)


def test_alibi_falcon_is_not(registered):
    support = arch.gguf_support(fixture("falcon-rw-1b"), registered)
    assert not support.supported
    assert support.reason.startswith(
        "Falcon with ALiBi positions and sequential attention and linear-layer biases"
    )


def test_an_unregistered_architecture_is_not(registered):
    support = arch.gguf_support({"architectures": ["AcmeForCausalLM"]}, registered)
    assert not support.supported and "AcmeForCausalLM is not one of the" in support.reason
    assert not arch.gguf_support({"architectures": []}, registered).supported


def test_multi_query_falcon_gets_one_kv_head_for_the_converter():
    published = fixture("falcon-7b")
    assert arch.converter_config(published)["num_kv_heads"] == 1
    merged = {**published, "num_kv_heads": 71}  # what save_pretrained writes after a merge
    assert arch.converter_config(merged)["num_kv_heads"] == 1
    assert arch.converter_config({**published, "num_kv_heads": 1}) is None
    assert arch.converter_config(fixture("falcon-40b")) is None  # grouped KV: as stated
    assert arch.converter_config(fixture("llama-2-7b")) is None


def test_the_older_falcon_form_becomes_the_built_in_one():
    legacy = fixture("falcon-7b-refinedwebmodel")
    assert needs_remote_code({**legacy, "model_type": "acme"})
    assert not needs_remote_code(legacy)
    built_in = arch.transformers_config(legacy)
    assert built_in["model_type"] == "falcon" and built_in["architectures"] == ["FalconForCausalLM"]
    assert (built_in["num_attention_heads"], built_in["num_hidden_layers"]) == (71, 32)
    assert "auto_map" not in built_in and "n_head" not in built_in
    assert built_in["new_decoder_architecture"] is False
    assert (
        arch.transformers_config({"model_type": "RefinedWeb"})["new_decoder_architecture"] is True
    )
    assert arch.transformers_config(fixture("falcon-7b")) is None


def test_converter_input_links_beside_the_folder_and_cleans_up(tmp_path):
    hf = tmp_path / "staged" / "falcon"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps(fixture("falcon-7b")))
    (hf / "model.safetensors").write_bytes(b"weights")
    with arch.converter_input(hf) as (folder, fixes):
        assert folder.parent == hf.parent and folder != hf
        assert fixes == {"num_kv_heads": [None, 1]}
        assert json.loads((folder / "config.json").read_text())["num_kv_heads"] == 1
        assert (folder / "model.safetensors").resolve() == (hf / "model.safetensors").resolve()
    assert sorted(p.name for p in hf.parent.iterdir()) == ["falcon"]
    assert "num_kv_heads" not in json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(fixture("llama-2-7b")))
    with arch.converter_input(hf) as (folder, fixes):
        assert (folder, fixes) == (hf, {})


def test_plan_reads_each_source_kind(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, name in ((good, "falcon-7b"), (bad, "falcon-rw-1b")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(fixture(name)))
    models = {
        "pkg": {"source": "package"},
        "good": {"source": "dir", "path": str(good)},
        "bad": {"source": "dir", "path": str(bad)},
        "forced": {"source": "dir", "path": str(bad), "force_gguf": True},
        "hub": {"source": "hub", "repo_id": "org/absent"},
    }
    plan = arch.plan(models, {"bad-ft": "bad"}, root=tmp_path, hub_cache_dir=str(tmp_path / "hub"))
    assert plan["pkg"].supported and plan["good"].supported and not plan["good"].reason
    assert not plan["bad"].supported and not plan["bad-ft"].supported
    assert plan["forced"].supported and plan["forced"].reason.startswith(
        "forced by models.forced.force_gguf"
    )
    assert plan["hub"].supported and "not downloaded yet" in plan["hub"].reason
    downloaded = tmp_path / "results/models/hub/hf"
    downloaded.mkdir(parents=True)
    (downloaded / "config.json").write_text(json.dumps(fixture("falcon-rw-1b")))
    assert not arch.plan(models, {}, root=tmp_path)["hub"].supported


def test_an_older_form_falcon_is_downloaded_as_the_built_in_one(tmp_path):
    """Our copy's config.json is rewritten (a file, not the link); the source stays as it is."""
    import torch
    from families import make_checkpoint
    from transformers import AutoModelForCausalLM

    src = make_checkpoint("falcon-7b-rw", tmp_path / "scratch" / "falcon-7b-rw", tmp_path / "bpe")
    before = (src / "config.json").read_text()
    record = fetch_model(
        "rw", {"source": "dir", "path": str(src)}, tmp_path / "hf", tmp_path / "manifest.json", {}
    )
    assert (src / "config.json").read_text() == before
    ours = tmp_path / "hf" / "config.json"
    assert not ours.is_symlink() and json.loads(ours.read_text())["model_type"] == "falcon"
    assert record["source"]["config_rewritten"]["model_type"] == ["RefinedWebModel", "falcon"]
    check_hf_folder(tmp_path / "hf")  # no remote code needed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(model).__name__ == "FalconForCausalLM"
