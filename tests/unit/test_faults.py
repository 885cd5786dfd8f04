"""The catalogue of bad inputs and faults: each gets one clear error naming the key or file.

Every test here carries ``@pytest.mark.fault(case, message)``; ``docs/faults.md`` is generated
from these markers and checked by ``test_catalogue_is_up_to_date`` (rewrite it with
``LLMPIPE_WRITE_CATALOGUE=1 pytest tests/unit/test_faults.py -k catalogue``); the cases only a
workflow run shows are in tests/workflow/test_faults_workflow.py.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, default_config, make_tiny_hf

from llmpipe import atomic, hardware, manifest
from llmpipe import config as cfg
from llmpipe.errors import ConfigError, IntegrityError, PipelineError, ResourceError, SourceError
from llmpipe.fetch import check_hf_folder, fetch_model
from llmpipe.gguf import convert_hf_to_gguf, gguf_info
from llmpipe.stage import ensure_staged

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CATALOGUE = REPO / "docs" / "faults.md"
fault = pytest.mark.fault


def config_error(mutate) -> str:
    config = default_config()
    mutate(config)
    with pytest.raises(ConfigError) as err:
        cfg.validate(config, SCHEMA)
        cfg.check(config, workdir=REPO)
    return str(err.value)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny")


@fault("a typo'd config key", "quantise: unknown key (expected one of: convert, …)")
def test_typo_key():
    msg = config_error(lambda c: c.update(quantise={"types": ["Q8_0"]}))
    assert msg.startswith("quantise: unknown key (expected one of: convert,")
    assert "quantize" in msg
    msg = config_error(lambda c: c["models"]["smollm2"].update(sorce="dir"))
    assert msg.startswith("models.smollm2.sorce: unknown key (expected one of: allow_pickle,")


@fault("an unknown quantization type", "quantize.types[1]: 'Q4_K_X' is not one of")
def test_unknown_quant():
    msg = config_error(lambda c: c["quantize"].update(types=["Q8_0", "Q4_K_X"]))
    assert msg.startswith("quantize.types[1]: 'Q4_K_X' is not one of")


@fault(
    "an IQ type without an imatrix",
    "quantize.types: 'IQ2_XS' needs an importance matrix: list it under quantize.imatrix.types",
)
def test_imatrix_quant(tmp_path):
    msg = config_error(lambda c: c["quantize"].update(types=["IQ2_XS"]))
    assert msg.startswith(
        "quantize.types: 'IQ2_XS' needs an importance matrix: list it under quantize.imatrix.types"
    )
    # listed there it is allowed: the variant IQ2_XS-imat is quantized with the model's matrix
    config = default_config()
    config["quantize"]["imatrix"] = {"types": ["IQ2_XS"]}
    cfg.check(cfg.validate(config, SCHEMA), workdir=REPO)
    assert cfg.quant_variants(config) == ["Q8_0", "Q4_K_M", "IQ2_XS-imat"]
    # and the quantization itself refuses it without a matrix, before reading anything
    from llmpipe.gguf import quantize_gguf

    out = tmp_path / "m-IQ2_XS.gguf"
    with pytest.raises(ConfigError, match="'IQ2_XS' needs an importance matrix: list it under"):
        quantize_gguf(tmp_path / "missing-F16.gguf", out, "IQ2_XS", 2, tmp_path / "m.json")
    assert not list(tmp_path.iterdir())


@fault("a missing calibration text", "quantize.imatrix.text: file …/nope.txt does not exist")
def test_missing_calibration_text():
    def mutate(c):
        c["quantize"]["imatrix"] = {"types": ["Q4_K_M"], "text": "config/eval/nope.txt"}

    msg = config_error(mutate)
    assert msg.startswith(f"quantize.imatrix.text: file {REPO}/config/eval/nope.txt does not exist")
    assert "expected a UTF-8 calibration text" in msg

    # with the default (null) the calibration text is cut from evaluate.text: that one must exist
    def default_text(c):
        c["quantize"]["imatrix"] = {"types": ["Q4_K_M"]}
        c["evaluate"]["text"] = "no.txt"

    msg = config_error(default_text)
    assert msg.startswith(f"evaluate.text: file {REPO}/no.txt does not exist (quantize.imatrix")


@pytest.mark.parametrize("name", ["org/model", "../escape", "my model", ".hidden", "a" * 65])
@fault(
    "a model id with '/', '..', spaces, a leading dot or 65+ characters",
    "models: 'org/model' is not a valid id (letters, digits, '.', '_', '-'; …)",
)
def test_unsafe_model_id(name):
    msg = config_error(lambda c: c["models"].update({name: {"source": "dir", "path": "/x"}}))
    assert msg.startswith(f"models: {name!r} is not a valid id")


@fault("a source folder that does not exist", "/nonexistent/llama does not exist")
def test_missing_source_folder(tmp_path):
    with pytest.raises(SourceError, match="/nonexistent/llama does not exist"):
        fetch_model(
            "m",
            {"source": "dir", "path": "/nonexistent/llama"},
            tmp_path / "hf",
            tmp_path / "manifest.json",
            {},
        )
    assert not (tmp_path / "manifest.json").exists()


@fault("a checkpoint with only pickle .bin files", "only pickle checkpoints")
def test_pickle_only(tiny_hf, tmp_path):
    folder = shutil.copytree(tiny_hf, tmp_path / "p")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="only pickle checkpoints .* allow_pickle: true"):
        check_hf_folder(folder)


@fault("a truncated safetensors file", "truncated safetensors file")
def test_truncated_safetensors(tiny_hf, tmp_path):
    folder = shutil.copytree(tiny_hf, tmp_path / "t")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(IntegrityError, match="model.safetensors: truncated safetensors file"):
        check_hf_folder(folder)


@fault("a corrupt GGUF (wrong magic bytes)", "not a GGUF file")
def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + os.urandom(4096))
    with pytest.raises(IntegrityError, match="bad.gguf: not a GGUF file"):
        gguf_info(bad)


@fault("a truncated GGUF", "truncated GGUF")
def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="cut.gguf: .*truncated"):
        gguf_info(cut)


@fault("a RAM disk without room", "stage.root: ... GB free, staging needs")
def test_ram_disk_full(tiny_hf, tmp_path):
    with pytest.raises(ResourceError, match="stage.root: .* GB free, staging needs"):
        ensure_staged(tiny_hf, manifest.build(tiny_hf), tmp_path, "m", reserve_gb=1e9)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB file system (tmpfs; needs root) standing in for a results disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@fault("an output disk that fills", "the disk is full")
def test_output_disk_full(small_disk):
    dest = small_disk / "big.json"
    with pytest.raises(ResourceError, match="big.json: the disk is full"):
        atomic.write_text(dest, "x" * 5_000_000)
    assert list(small_disk.iterdir()) == []  # no partial file under any name


@pytest.fixture
def gpu_node(tmp_path, monkeypatch):
    """A node whose driver answers (a stand-in nvidia-smi) and which granted GPU 0."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: Tesla V100-PCIE-32GB (UUID: GPU-fake)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv(hardware.FAKE_GRES_ENV, raising=False)


@fault("a GPU job where torch sees no GPU", "finetune on <node>: needs a GPU, but torch")
def test_gpu_job_torch_without_gpu(gpu_node):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    need = hardware.need_for_torch("finetune", "gpu:v100d32q:1", wants_cuda=True)
    with pytest.raises(ResourceError, match=r"^finetune on .*: needs a GPU, but torch .*(CPU-only"
                       r" build|sees no GPU).*(LLMPIPE_CUDA=1|--gres)"):  # fmt: skip
        hardware.check(need)


@fault(
    "CPU-only llama.cpp with n_gpu_layers: -1",
    "this llama.cpp build has no GPU backend (its ggml devices: CPU/RPC only)",
)
def test_cpu_only_llama_cpp_offloading(gpu_node):
    pytest.importorskip("llama_cpp")
    from llmpipe import provenance

    if provenance.llama_cpp_build()["cuda"]:
        pytest.skip("this llama.cpp is a CUDA build")
    settings = {**default_config()["evaluate"]["llama_cpp"], "n_gpu_layers": -1}
    need = hardware.need_for_eval("evaluate_shard", "gpu:v100d32q:1", "llama.cpp", settings)
    with pytest.raises(ResourceError, match=r"^evaluate_shard on .*no GPU backend.*n_gpu_layers"):
        hardware.check(need)


@fault("a step that does not fit", "big: finetune does not fit: … would fit: … on 2 GPU(s)")
def test_step_that_does_not_fit():
    from llmpipe.resources import checked_request

    config_json = REPO / "tests" / "fixtures" / "model_configs" / "llama-2-13b.json"
    opts = {"method": "lora", "hw": "gpu", "dtype": "f16", "micro_batch": 16, "seq_len": 4096,
            "gradient_checkpointing": False}  # fmt: skip
    with pytest.raises(ResourceError) as err:
        checked_request("big", "finetune", config_json, **opts)
    message = str(err.value)
    assert message.startswith("big: finetune does not fit: does not fit even on 8 GPUs")
    assert "would fit: batch_size: 1 with gradient_checkpointing: true on 2 GPU(s)" in message
    assert "\n" not in message
    # The same job on the CPU is not stopped: the planner cannot know the nodes' RAM.
    assert checked_request("big", "finetune", config_json, **{**opts, "hw": "cpu"}).mem_mb > 0


@fault("a model that needs trust_remote_code without opt-in", "trust_remote_code: true")
def test_remote_code(tiny_hf, tmp_path):
    folder = shutil.copytree(tiny_hf, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="acme_lm", auto_map={"AutoModelForCausalLM": "m.AcmeLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="'acme_lm' is not built into transformers"):
        check_hf_folder(folder)


@fault("an architecture the converter does not support", "is not supported by the pinned")
def test_unsupported_architecture(tiny_hf, tmp_path):
    folder = shutil.copytree(tiny_hf, tmp_path / "u")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["AcmeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "u.gguf"
    with pytest.raises(PipelineError, match=r"\['AcmeForCausalLM'\] is not supported"):
        convert_hf_to_gguf(folder, out, "f16", tmp_path / "out" / "u.json")
    assert list(out.parent.iterdir()) == []


@fault("a hub source while offline", "not in ... and the hub cannot be reached")
def test_hub_offline(tmp_path):
    with pytest.raises(SourceError, match="'org/absent' .* hub cannot be reached"):
        fetch_model(
            "m",
            {"source": "hub", "repo_id": "org/absent"},
            tmp_path / "hf",
            tmp_path / "m.json",
            {"cache_dir": str(tmp_path / "cache"), "offline": True},
        )


@fault("a relative path for a shared-storage model", "models.m.path: 'scratch/x' is relative")
def test_relative_path():
    msg = config_error(lambda c: c["models"].update(m={"source": "dir", "path": "scratch/x"}))
    assert "models.m.path: 'scratch/x' is relative" in msg


@fault("a source package that is not installed", "'acme_models' is not installed")
def test_missing_package(tmp_path):
    spec = {"source": "package", "package": "acme_models", "file": "m.gguf"}
    with pytest.raises(SourceError, match="'acme_models' is not installed"):
        fetch_model("m", spec, tmp_path / "hf", tmp_path / "m.json", {})


@fault("a shell metacharacter in a config string", "does not exist (no command runs)")
def test_no_config_string_reaches_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    path = f"/nonexistent/$(touch {marker});touch {marker}"
    with pytest.raises(SourceError, match="does not exist"):
        fetch_model("m", {"source": "dir", "path": path}, tmp_path / "hf", tmp_path / "m.json", {})
    assert not marker.exists()


@fault("a staged copy damaged after staging", "re-staged (reason: damaged)")
def test_damaged_stage(tiny_hf, tmp_path):
    mf = manifest.build(tiny_hf)
    staged = Path(ensure_staged(tiny_hf, mf, tmp_path, "m")["path"])
    (staged / "model.safetensors").write_bytes(b"")
    record = ensure_staged(tiny_hf, mf, tmp_path, "m")
    assert not record["hit"] and "damaged" in record["reason"]
    manifest.verify(staged, mf, check_hash=True)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A valid GGUF with two tensors, written with the gguf library."""
    import numpy as np
    from gguf import GGUFWriter

    out = tmp_path_factory.mktemp("g") / "tiny-F16.gguf"
    writer = GGUFWriter(str(out), "llama")
    writer.add_tensor("a.weight", np.ones((64, 64), dtype=np.float16))
    writer.add_tensor("b.weight", np.zeros((64, 128), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_info(out)["n_params"] == 64 * 64 + 64 * 128
    return out


# ---------------------------------------------------------------------------------------------
# The catalogue document, generated from the markers above (and in any other test file).


def collect_catalogue() -> list[tuple[str, str, str]]:
    rows = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and isinstance(deco.func, (ast.Name, ast.Attribute))
                    and (
                        getattr(deco.func, "id", None) == "fault"
                        or getattr(deco.func, "attr", None) == "fault"
                    )
                ):
                    case, message = (ast.literal_eval(a) for a in deco.args[:2])
                    test = f"{path.relative_to(REPO / 'tests')}::{node.name}"
                    rows.append((case, message, test))
    return rows


def render_catalogue(rows) -> str:
    lines = [
        "# Bad inputs and faults",
        "",
        "Each row is backed by the test named in it; every case ends in one clear error naming",
        "the key or file and what was expected, and leaves no output under its final name.",
        "Generated from the `@pytest.mark.fault` markers in `tests/`"
        " (see tests/unit/test_faults.py).",
        "",
        "| # | case | message (excerpt) | test |",
        "|---|---|---|---|",
    ]
    for i, (case, message, test) in enumerate(rows, 1):
        lines.append(f"| {i} | {case} | `{message}` | `{test}` |")
    return "\n".join(lines) + "\n"


def test_catalogue_is_up_to_date():
    rows = collect_catalogue()
    text = render_catalogue(rows)
    if os.environ.get("LLMPIPE_WRITE_CATALOGUE"):
        CATALOGUE.parent.mkdir(exist_ok=True)
        CATALOGUE.write_text(text)
    assert len(rows) >= 20
    assert CATALOGUE.read_text() == text, "docs/faults.md is stale: see this file's docstring"


def test_markers_are_registered():
    assert "fault" in copy.deepcopy((REPO / "pyproject.toml").read_text())


@fault("a malformed fine-tune JSONL line", "train.jsonl:2: not valid JSON")
def test_malformed_jsonl_line(tmp_path):
    from llmpipe.finetune.dataset import read_jsonl

    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", \n')
    with pytest.raises(SourceError, match=r"train.jsonl:2: not valid JSON"):
        read_jsonl(data)
    data.write_text('{"instruction": "a"}\n')
    with pytest.raises(SourceError, match=r"train.jsonl:1: 'response' missing or empty"):
        read_jsonl(data)
