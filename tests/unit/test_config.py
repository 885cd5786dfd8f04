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
    config = default_config()
    schema_check(config)
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
        (lambda c: c["quantize"].update(types=["IQ2_XS"]), "importance matrix"),
        (lambda c: c["quantize"].update(types=["F16", "Q8_0"]), "already the reference"),
        (lambda c: c["quantize"].update(types=["Q8_0", "Q8_0"]), "listed twice"),
        (lambda c: c["models"].update(m={"source": "dir"}), "models.m.path: missing"),
        (lambda c: c["models"].update(m={"source": "dir", "path": "rel/x"}), "relative"),
        (lambda c: c["models"].update(m={"source": "hub"}), "models.m.repo_id: missing"),
        (lambda c: c.update(prompts="config/nope.txt"), "config/nope.txt does not exist"),
    ],
)
def test_cross_key_checks(mutate, expected):
    config = default_config()
    mutate(config)
    with pytest.raises(ConfigError, match=expected):
        cfg.check(config, workdir=REPO)


def test_every_quant_type_maps_to_a_llama_cpp_constant():
    from llmpipe.gguf import ftype_constant

    schema = yaml.safe_load(Path(SCHEMA).read_text())
    enum = schema["properties"]["quantize"]["properties"]["types"]["items"]["enum"]
    assert set(cfg.QUANT_TYPES) | set(cfg.IMATRIX_TYPES) == set(enum)
    values = {quant: ftype_constant(quant) for quant in cfg.QUANT_TYPES}
    assert len(set(values.values())) == len(values)  # no two names share a file type


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
