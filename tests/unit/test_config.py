"""Config validation: the schema and the cross-key checks give one clear error per mistake."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from helpers import REPO, default_config

from llmpipe import config as cfg
from llmpipe.errors import ConfigError

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def schema_check(config: dict) -> None:
    cfg.validate(copy.deepcopy(config), SCHEMA)


def test_default_config_is_valid():
    config = cfg.validate(default_config())
    cfg.check(config, workdir=REPO)
    assert cfg.model_ids(config) == ["smollm2"]
    assert cfg.reference_variant(config) == "F16"
    assert cfg.quant_types(config) == ["Q8_0", "Q4_K_M"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(quantise={"types": ["Q8_0"]}), "quantise"),
        (lambda c: c["quantize"].update(types=["Q9_9"]), "Q9_9"),
        (lambda c: c["models"]["smollm2"].update(sorce="dir"), "sorce"),
        (lambda c: c["models"].update({"a/b": {"source": "dir", "path": "/x"}}), "a/b"),
        (lambda c: c["models"].update({"a b": {"source": "dir", "path": "/x"}}), "a b"),
        (lambda c: c["models"].update({"..": {"source": "dir", "path": "/x"}}), ".."),
        (lambda c: c["models"]["smollm2"].update(source="ftp"), "ftp"),
        (lambda c: c["convert"].update(outtype="f8"), "f8"),
        (lambda c: c["stage"].update(verify="md5"), "md5"),
        (lambda c: c.update(models={}), "models: {} should be non-empty"),
        (lambda c: c["quantize"].update(types=["IQ2_XS"]), "'IQ2_XS' needs an importance matrix"),
        (lambda c: c["finetune"]["defaults"].update(heldout_fraction=1), "heldout_fraction: 1"),
        (lambda c: c["finetune"].update(enabled_for=["smollm2"] * 2), "non-unique"),
        (lambda c: c["evaluate"]["llama_cpp"].update(parallel=0), "llama_cpp.parallel: 0"),
        (lambda c: c["evaluate"]["llama_cpp"].update(parallel=257), "llama_cpp.parallel: 257"),
    ],
)
def test_schema_rejects_with_the_key_named(mutate, expected):
    config = default_config()
    mutate(config)
    with pytest.raises(ConfigError) as err:
        schema_check(config)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["quantize"].update(types=["F16", "Q8_0"]), "already the reference"),
        (lambda c: c["quantize"].update(types=["Q8_0", "Q8_0"]), "listed twice"),
        (lambda c: c["models"].update(m={"source": "dir"}), "models.m.path: missing"),
        (lambda c: c["models"].update(m={"source": "dir", "path": "rel/x"}), "relative"),
        (lambda c: c["models"].update(m={"source": "hub"}), "models.m.repo_id: missing"),
        (lambda c: c.update(prompts="config/nope.txt"), "config/nope.txt does not exist"),
        (
            lambda c: c.update(
                convert={"outtype": "q8_0"},
                quantize={"types": ["Q4_K_M"], "imatrix": {"types": ["Q8_0"]}},
            ),
            "quantize.imatrix.types: 'Q8_0' is the reference GGUF itself",
        ),
    ],
)
def test_cross_key_checks(mutate, expected):
    config = default_config()
    mutate(config)
    cfg.validate(config, SCHEMA)
    with pytest.raises(ConfigError, match=expected):
        cfg.check(config, workdir=REPO)


def test_every_quant_type_maps_to_a_llama_cpp_constant():
    from llmpipe.gguf import ftype_constant

    assert cfg.choices("quantize.types") == cfg.QUANT_TYPES
    # the types only quantize.imatrix.types allows: they need a matrix
    needs_matrix = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")
    assert needs_matrix == cfg.IMATRIX_TYPES
    # an importance matrix changes every quantization but the unquantized types
    no_matrix = set(cfg.QUANT_TYPES) - set(cfg.choices("quantize.imatrix.types"))
    assert no_matrix == {"F16", "BF16", "F32"}
    values = {quant: ftype_constant(quant) for quant in cfg.QUANT_TYPES + cfg.IMATRIX_TYPES}
    assert len(set(values.values())) == len(values)  # no two names share a file type


# ---- The schema as the one source of each key's facts -------------------------------------


def test_validate_fills_every_default_from_the_schema():
    config = cfg.validate({"models": {"m": {"source": "dir", "path": "/x"}}})
    assert config["convert"] == {"outtype": "f16"}
    assert config["models"]["m"]["imatrix"] is True
    assert config["quantize"]["imatrix"] == cfg.defaults("quantize.imatrix")
    assert config["evaluate"]["llama_cpp"]["kv_type"] == "f16"
    assert config["finetune"]["defaults"] == cfg.defaults("finetune.defaults")
    # per-model fine-tune overrides stay as written: they layer over finetune.defaults
    config = cfg.validate({**config, "finetune": {"models": {"m": {"lora_r": 4}}}})
    assert config["finetune"]["models"] == {"m": {"lora_r": 4}}


def test_choices_and_defaults_come_from_the_schema():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    llama = schema["properties"]["evaluate"]["properties"]["llama_cpp"]["properties"]
    assert cfg.choices("evaluate.llama_cpp.kv_type") == tuple(llama["kv_type"]["enum"])
    assert cfg.choices("evaluate.backends") == ("llama.cpp", "transformers")  # a list's items
    assert cfg.choices("models.*.source") == ("package", "dir", "hub")
    assert cfg.choices("finetune.models.*.method") == ("lora", "qlora")  # through its $ref
    assert cfg.defaults("stage") == {"root": "/dev/shm", "verify": "size", "reserve_gb": 1}
    with pytest.raises(KeyError, match="evaluate.llama_cpp.kv: not a key"):
        cfg.key_schema("evaluate.llama_cpp.kv")
    with pytest.raises(KeyError, match="no choices"):
        cfg.choices("evaluate.threads")


def test_backends_take_their_defaults_from_the_schema():
    from llmpipe.evaluation import hf_backend, llama_backend

    llama = llama_backend.LlamaSettings.from_config({}, threads=3).as_dict()
    schema = cfg.defaults("evaluate.llama_cpp")
    assert llama["n_threads"] == 3 and llama["n_threads_batch"] == 3
    assert {k: v for k, v in llama.items() if not k.startswith("n_threads")} == {
        k: v for k, v in schema.items() if k in llama and not k.startswith("n_threads")
    }
    hf = hf_backend.HFSettings.from_config({}, threads=3).as_dict()
    assert hf == {**cfg.defaults("evaluate.transformers"), "threads": 3}


def test_every_schema_key_has_a_description():
    def walk(node, path):
        node = cfg.resolve_ref(node)
        for name, sub in node.get("properties", {}).items():
            key = f"{path}.{name}" if path else name
            assert cfg.resolve_ref(sub).get("description"), key
            walk(sub, key)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")

    walk(cfg.schema(), "")


def test_config_readme_tables_match_the_schema():
    """config/README.md's key tables are generated: rerun `python -m llmpipe.config_docs`."""
    from llmpipe import config_docs

    readme = config_docs.README.read_text(encoding="utf-8")
    assert config_docs.render(readme) == readme, "run: python -m llmpipe.config_docs"
    assert "| `kv_type` |" not in readme and "| `llama_cpp.kv_type` |" in readme


def test_config_readme_names_a_key_no_table_lists():
    from llmpipe import config_docs

    readme = config_docs.README.read_text(encoding="utf-8")
    without_farm = readme.replace("<!-- keys: farm -->", "")
    with pytest.raises(ValueError, match="no table lists farm.shards"):
        config_docs.render(without_farm)


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  \nsecond line\\nwith a break\n")
    assert cfg.read_prompts(path) == ["first", "second line\nwith a break"]
    path.write_text("\n \n")
    with pytest.raises(ConfigError, match="has no prompts"):
        cfg.read_prompts(path)


def test_conda_env_installs_the_same_locks_as_setup():
    """workflow/envs/llmpipe.yaml (for --sdm conda) installs the lock files, pins nothing itself."""
    env = yaml.safe_load((REPO / "workflow" / "envs" / "llmpipe.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-r ../../env/requirements.lock", "-r ../../env/llama-cpp-python.lock"]
    for line in pip:
        assert (REPO / "workflow" / "envs" / line.split()[1]).is_file()


def test_lock_pins_every_top_level_package_as_pyproject_does():
    """env/requirements.lock is generated from pyproject.toml (tools/lock.sh): same pins."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    top = [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    top += project["optional-dependencies"]["dev"]
    locked = {}
    for line in (REPO / "env" / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(" ")[0].split("==")
            locked[name.lower().replace("_", "-")] = version.split("+")[0]
    for req in top:
        name, version = req.split("==")
        assert locked.get(name.lower().replace("_", "-")) == version, req
    hashes = (REPO / "env" / "requirements.lock").read_text().count("--hash=sha256:")
    assert hashes >= len(locked)


def test_prompt_tokens_bound_from_the_longest_prompts_size():
    from llmpipe.config import prompt_tokens_bound

    assert prompt_tokens_bound(["a" * 59, "short"]) == 21  # ceil(59 / 3) + 1 for BOS
    assert prompt_tokens_bound(["é" * 3]) == 3  # UTF-8 bytes: 6 / 3 + 1
