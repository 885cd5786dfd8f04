"""The backend registry and interface, checked without importing any backend's library (one
real evaluation through each backend: tests/workflow/test_backends_workflow.py)."""

from __future__ import annotations

import json
import subprocess
import sys

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
