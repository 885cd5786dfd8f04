"""The per-step estimators against hand-computed numbers for the fixture configs, and the CLI.

Fixtures are the published config.json files of the models (tests/fixtures/model_configs); the
shapes themselves are tested in test_estimate_shape.py.
MiB = 2**20; a V100-32GB plans 32768 MiB x (1 - 0.10 headroom) = 29491.2 MiB per GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llmpipe import estimate as est
from llmpipe.errors import ConfigError, ResourceError
from llmpipe.estimate import MIB, V100, ModelShape, gpus_needed, weights_bytes

FIXTURES = Path(__file__).parents[1] / "fixtures" / "model_configs"
MODELS = ["llama-2-7b", "llama-2-13b", "mistral-7b-v0.1", "falcon-7b", "smollm2-135m"]
USABLE_MB = 32768 * 0.9  # 29491.2


def shape(name: str) -> ModelShape:
    return ModelShape.from_config(FIXTURES / f"{name}.json")


# ---- GPU counts ------------------------------------------------------------------------------


def test_gpus_needed_even_and_by_layer():
    # 40,000 MB + 1024 overhead > 29,491.2 on one; 20,000 + 1024 fits on two
    fit = gpus_needed(40_000, 32768, 0.10, per_gpu_overhead_mb=1024)
    assert fit.gpus == 2 and fit.per_gpu_mb == 21_024 and fit.usable_mb == 29_491
    # 90,000 MB by 40 layers: three GPUs hold ceil(40/3) = 14 layers -> 31,500 + 1024 > usable;
    # four hold 10 -> 22,500 + 1024
    assert gpus_needed(90_000, 32768, 0.10, per_gpu_overhead_mb=1024, shard_units=40).gpus == 4
    # replicated memory is paid on every GPU
    assert gpus_needed(20_000, replicated_mb=9_000, per_gpu_overhead_mb=1024).gpus == 2


def test_gpus_needed_does_not_fit():
    fit = gpus_needed(1_000_000, 32768, 0.10, max_gpus=8)
    assert not fit.fits and fit.gpus is None
    assert "does not fit even on 8 GPUs" in str(fit)
    with pytest.raises(ConfigError):
        gpus_needed(1, headroom=1.5)


# ---- classification on V100-32GB -----------------------------------------------------------


def test_llama_2_7b_fp16_inference_fits_one_v100():
    s = shape("llama-2-7b")
    e = est.evaluate_transformers(s, dtype="f16", batch=1)  # prompt 4096 - 128, 128 new
    assert e.gpus == 1 and e.fits
    # weights 13,476,831,232 + KV 2 GiB (3968 + 128 tokens) + activations
    # 3968 * (4*4096 + 3*11008) * 2 = 392,101,888 + logits 3968 * 32000 * (2+4+4) = 1,269,760,000
    # + 1024 MiB overhead = 17,509.4 MiB < 29,491.2
    expected = (13_476_831_232 + 2**31 + 392_101_888 + 1_269_760_000) / MIB + 1024
    assert e.gpu_mem_mb == math.ceil(expected)
    assert e.gpu_mem_mb < USABLE_MB


def test_llama_2_13b_fp16_inference_needs_two_v100s():
    s = shape("llama-2-13b")
    e = est.evaluate_transformers(s, dtype="f16", batch=1)
    # weights 26,031,728,640 B = 24,825.8 MiB; KV 2*40*5120*4096*2 = 3,200 MiB;
    # activations 3968 * (4*5120 + 3*13824) * 2 = 468.9 MiB; logits 1,210.9 MiB; +1024
    # = 30,729.6 MiB > 29,491.2 -> 2 GPUs, 20 layers each: 14,012.9 + 1,679.8 + 1024
    assert e.gpus == 2 and e.fits
    weights, kv = 26_031_728_640, 2 * 40 * 5120 * 4096 * 2
    replicated = 3968 * (4 * 5120 + 3 * 13824) * 2 + 3968 * 32000 * 10
    assert e.gpu_mem_mb == math.ceil((weights + kv) / 2 / MIB + replicated / MIB + 1024)
    # ...while a short prompt (512 + 128 tokens) squeezes onto one: 26,567 MiB
    assert est.evaluate_transformers(s, dtype="f16", seq_len=512).gpus == 1


def test_llama_2_13b_lora_needs_several_gpus_but_qlora_fits_one():
    s = shape("llama-2-13b")
    # micro-batch 4 x 2048 tokens, gradient checkpointing on:
    # base f16 24,825.8 MiB + LoRA 62,586,880 params x 16 B = 955.0 MiB
    # + checkpoints 8192 * 40 * 5120 * 2 = 3,200 MiB (sharded by layer)
    # + one recomputed layer 8192 * 233,472 B = 1,824 MiB + logits 8192 * 32000 * 14 = 3,500 MiB
    # + 1024 -> 35,329 MiB on one GPU: two needed
    lora = est.finetune(s, "lora", dtype="f16", micro_batch=4, seq_len=2048)
    assert lora.gpus >= 2 and lora.fits
    assert lora.detail["trainable_params"] == 62_586_880
    assert lora.detail["transient_activation_bytes"] == 8192 * 233_472
    # QLoRA: nf4 base 6,868 MiB instead of 24,826 -> about 17,500 MiB: one GPU
    qlora = est.finetune(s, "qlora", quant="nf4", micro_batch=4, seq_len=2048)
    assert qlora.gpus == 1 and qlora.fits
    assert qlora.gpu_mem_mb < USABLE_MB
    # without gradient checkpointing LoRA needs even more GPUs
    assert (
        est.finetune(s, "lora", micro_batch=4, seq_len=2048, gradient_checkpointing=False).gpus
        > lora.gpus
    )


def test_7b_full_finetune_does_not_fit_one_gpu():
    s = shape("llama-2-7b")
    e = est.finetune(s, "full", dtype="f16")
    # 16 B/param (2 weights + 2 grads + 4 fp32 master + 8 AdamW) x 6,738,415,616 = 102,820 MiB
    assert e.detail["states_bytes"] == 16 * 6_738_415_616
    assert e.gpus > 1 or not e.fits
    assert 16 * 6_738_415_616 / MIB > USABLE_MB


def test_not_fitting_step_refuses_resources():
    e = est.finetune(shape("llama-2-13b"), "full", gradient_checkpointing=False)
    assert not e.fits
    with pytest.raises(ResourceError, match="does not fit even on 8 GPUs"):
        e.resources()
    ok = est.evaluate_transformers(shape("llama-2-7b")).resources()
    assert ok["gpu"] == 1 and ok["mem_mb"] > 0 and ok["runtime"] >= 5


# ---- CPU steps -----------------------------------------------------------------------------


def test_stage_counts_ram_disk_in_job_memory():
    e = est.cache_to_shm(shape("llama-2-7b"))  # f16 checkpoint, 13,476,831,232 B
    # (12,852.5 MiB staged + 1024 MiB process) x 1.25 margin
    assert e.mem_mb == math.ceil((13_476_831_232 + 1024 * MIB) * 1.25 / MIB)
    assert e.gpus == 0


def test_convert_is_lazy_largest_tensors_not_whole_model():
    s = shape("llama-2-7b")
    e = est.convert_to_gguf(s)
    # largest tensor: embedding 32000*4096 = 131,072,000; 2 in flight x (2 f16 + 4 f32 + 2 f16)
    # + 3072 MiB process, x 1.25: 9,120 MiB... far below the 12,852 MiB checkpoint x 1.25
    assert s.largest_tensor_params == 131_072_000
    assert e.mem_mb == math.ceil((3072 * MIB + 2 * 131_072_000 * 8) * 1.25 / MIB)
    assert e.disk_mb == math.ceil(13_477_363_712 / MIB)
    # staged: the RAM-disk copy is added
    assert est.convert_to_gguf(s, staged=True).mem_mb > e.mem_mb + 12_000


def test_quantize_buffers():
    e = est.quantize(shape("falcon-7b"), "Q4_K_M")
    # Falcon's embedding 65024*4544 = 295,469,056 weights x 8 B (f32 + work) + 1024 MiB
    assert e.mem_mb == math.ceil((1024 * MIB + 295_469_056 * 8) * 1.25 / MIB)
    with pytest.raises(ConfigError, match="expected a llama.cpp type"):
        est.quantize(shape("falcon-7b"), "nf4")


# ---- runtime -------------------------------------------------------------------------------


def test_decode_is_memory_bound():
    s = shape("llama-2-7b")
    e = est.evaluate_transformers(s, dtype="f16")
    # f16 decode reads 13.5 GB per step: at most 900e9 / 13,476,831,232 = 66.8 tokens/s
    assert e.detail["decode_tokens_per_s"] < 900e9 / 13_476_831_232
    q = est.evaluate_llama_cpp(s, quant="Q4_K_M")
    assert q.detail["decode_tokens_per_s"] > 2 * e.detail["decode_tokens_per_s"]


def test_lora_compute_uses_4n_and_full_6n():
    s = shape("llama-2-7b")
    n_mm = 6_738_415_616 - 131_072_000  # matmul params: everything but the embedding lookup
    attn = 2 * 32 * 4096 * 2048  # forward attention FLOPs per token at 2048 context
    tokens = 100 * 4 * 2048  # steps x micro-batch x seq_len
    peak = 125e12 * 0.30
    lora = est.finetune(s, "lora", gradient_checkpointing=False, micro_batch=4, seq_len=2048)
    full = est.finetune(s, "full", gradient_checkpointing=False, micro_batch=4, seq_len=2048)
    assert lora.detail["compute_s"] == pytest.approx(
        tokens * (4 * n_mm + 3 * attn + 6 * 39_976_960) / peak
    )
    assert full.detail["compute_s"] == pytest.approx(tokens * (6 * n_mm + 3 * attn) / peak)
    # gradient checkpointing adds a forward pass: +2N and one more attention forward
    gc = est.finetune(s, "lora", gradient_checkpointing=True, micro_batch=4, seq_len=2048)
    assert gc.detail["compute_s"] == pytest.approx(
        tokens * (6 * n_mm + 4 * attn + 6 * 39_976_960) / peak
    )


def test_cpu_device_puts_everything_in_host_memory():
    s = shape("smollm2-135m")
    laptop = est.cpu(cores=2)
    e = est.evaluate_transformers(s, dtype="f32", hw=laptop, seq_len=512, new_tokens=64)
    assert e.gpus == 0 and e.gpu_mem_mb == 0 and e.fits
    assert e.mem_mb * MIB > weights_bytes(s, "f32")
    big = est.evaluate_transformers(shape("llama-2-13b"), dtype="f32", hw=laptop)
    assert not big.fits  # 52 GB of f32 weights on an 8 GiB laptop


def test_bf16_on_v100_is_flagged_and_slower():
    s = shape("mistral-7b-v0.1")
    f16 = est.finetune(s, "lora", dtype="f16")
    bf16 = est.finetune(s, "lora", dtype="bf16")
    assert any("no bf16 tensor cores" in n for n in bf16.notes)
    assert bf16.detail["compute_s"] > 5 * f16.detail["compute_s"]
    assert V100.flops("bf16") == V100.flops("f32")


# ---- CLI -------------------------------------------------------------------------------------

STEPS = [
    "download",
    "cache_to_shm",
    "convert_to_gguf",
    "imatrix",
    "quantize",
    "evaluate_transformers",
    "evaluate_llama_cpp",
    "finetune-lora (gc on)",
    "finetune-lora (gc off)",
    "finetune-qlora (gc on)",
    "finetune-qlora (gc off)",
    "finetune-full (gc on)",
    "finetune-full (gc off)",
]


@pytest.mark.parametrize("model", MODELS + ["falcon-7b-refinedwebmodel", "falcon-rw-1b"])
def test_cli_table_has_every_step(model, capsys):
    assert est.main([str(FIXTURES / f"{model}.json")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for step in STEPS:
        assert any(line.startswith(step + " ") for line in lines), step
    assert "host GB" in out and "GPUs" in out and "runtime" in out


@pytest.mark.parametrize("model", MODELS)
def test_cli_json(model, capsys):
    argv = [str(FIXTURES / f"{model}.json"), "--json", "--quant", "Q5_K_M", "--seq-len", "1024"]
    assert est.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["params"] == shape(model).n_params
    assert [row["step"] for row in doc["steps"]] == STEPS
    for row in doc["steps"]:
        assert {"mem_mb", "runtime_min", "gpus", "gpu_mem_mb", "fits", "notes"} <= set(row)


def test_cli_13b_table_classes(capsys):
    assert est.main([str(FIXTURES / "llama-2-13b.json"), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)["steps"]}
    assert rows["evaluate_transformers"]["gpus"] == 2
    assert rows["finetune-lora (gc on)"]["gpus"] >= 2
    assert rows["finetune-qlora (gc on)"]["gpus"] == 1


def test_cli_cpu_and_errors(tmp_path, capsys):
    assert (
        est.main([str(FIXTURES / "smollm2-135m.json"), "--device", "cpu", "--seq-len", "256"]) == 0
    )
    assert "device cpu" in capsys.readouterr().out
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    assert est.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and str(bad) in err
    assert est.main([str(FIXTURES / "smollm2-135m.json"), "--quant", "Q9"]) == 2


def test_module_entry_point_and_no_heavy_imports():
    code = (
        "import sys, llmpipe.estimate; "
        "print(any(m in sys.modules for m in ('torch', 'transformers', 'numpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    run = subprocess.run(
        [sys.executable, "-m", "llmpipe.estimate", str(FIXTURES / "falcon-7b.json"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(run.stdout)["model"]["kv_heads"] == 1


# ---- evaluation as the workflow runs it: short prompts, generation, flash attention ---------


def test_llama_cpp_counts_every_allocated_cell_and_scratch_for_the_pass_it_runs():
    s = shape("smollm2-135m")  # 9 heads, vocab 49152, ffn 1536, hidden 576, KV 23,040 B/cell
    laptop = est.cpu(cores=2)
    short = dict(quant="Q8_0", seq_len=21, new_tokens=100, kv_type="f16")
    # CPU: KV for all n_ctx cells (llama.cpp clears the cache when it makes the context, so
    # every page is written); compute scratch for the 21-token prompt
    cpu = est.evaluate_llama_cpp(s, hw=laptop, n_ctx=2048, flash_attn=True, **short)
    assert cpu.detail["kv_cache_bytes"] == 2048 * 23_040
    # scratch per prompt token, logits for the one position generation needs
    assert cpu.detail["compute_buffer_bytes"] == 4 * (21 * (2 * 1536 + 4 * 576) + 49152)
    assert cpu.detail["logits_out_bytes"] == 2 * 49152 * 4
    # 32 sequences decoded together: 32 x n_ctx cells, a 32-token decode step (wider than the
    # prompt pass) with 32 rows of logits, in the step's output buffer and the caller's copy
    par = est.evaluate_llama_cpp(s, hw=laptop, n_ctx=2048, flash_attn=True, batch=32, **short)
    assert par.detail["kv_cache_bytes"] == 32 * 2048 * 23_040
    assert par.detail["compute_buffer_bytes"] == 4 * 32 * (2 * 1536 + 4 * 576 + 49152)
    assert par.detail["logits_out_bytes"] == 2 * 32 * 49152 * 4
    # without flash attention the scores (heads x context per token) come back
    plain = est.evaluate_llama_cpp(s, hw=laptop, n_ctx=2048, flash_attn=False, **short)
    assert plain.detail["compute_buffer_bytes"] == 4 * (21 * (9 * 121 + 3072 + 2304) + 49152)
    # perplexity keeps the scored half's logits: 255 rows of a 512-token chunk
    ppl = est.evaluate_llama_cpp(
        s, hw=laptop, quant="F16", seq_len=511, new_tokens=1, n_ctx=512, outputs=255,
        flash_attn=True,
    )  # fmt: skip
    assert ppl.detail["compute_buffer_bytes"] == 4 * (511 * (3072 + 2304) + 255 * 49152)
    assert ppl.detail["logits_out_bytes"] == 2 * 255 * 49152 * 4
    # GPU: the whole n_ctx of KV, and the buffer reserved for a 512-token micro-batch
    gpu = est.evaluate_llama_cpp(s, hw=V100, n_ctx=2048, flash_attn=True, **short)
    assert gpu.detail["kv_cache_bytes"] == 2048 * 23_040
    assert gpu.detail["compute_buffer_bytes"] == 512 * 4 * (49152 + 2 * 1536 + 4 * 576)


def test_generation_keeps_the_last_positions_logits_perplexity_all_of_them():
    s = shape("llama-2-7b")
    gen = est.evaluate_transformers(s, dtype="f16", batch=16, seq_len=32, full_logits=False)
    ppl = est.evaluate_transformers(s, dtype="f16", batch=1, seq_len=512, full_logits=True)
    assert gen.detail["logits_bytes"] == 16 * 32000 * (2 + 4 + 4)
    assert ppl.detail["logits_bytes"] == 512 * 32000 * (2 + 4 + 4)
    # compare_finetune scores the response only: every position's logits in the dtype, and the
    # 20 scored ones copied out (f16), upcast (fp32) and log-softmaxed (fp32); in f32 no upcast
    kw = {"batch": 4, "seq_len": 100, "full_logits": True, "scored_tokens": 20}
    resp = est.evaluate_transformers(s, dtype="f16", **kw)
    assert resp.detail["logits_bytes"] == 4 * 32000 * (100 * 2 + 20 * (2 + 4 + 4))
    resp32 = est.evaluate_transformers(s, dtype="f32", hw=est.cpu(), **kw)
    assert resp32.detail["logits_bytes"] == 4 * 32000 * (100 * 4 + 20 * (4 + 4))


def test_merge_holds_the_model_once_in_its_dtype():
    s = shape("smollm2-135m")
    m = est.merge_lora(s, dtype="float16", a=est.CALIBRATED)
    # 400 MiB torch process + 269,030,016 B of f16 weights + one f32 delta 576 x 1536 x 4
    assert m.detail["host_peak_bytes"] == 400 * MIB + 269_030_016 + 884_736 * 4
    assert m.mem_mb == math.ceil(m.detail["host_peak_bytes"] * 1.25 / MIB)
    big = est.merge_lora(shape("llama-2-13b"), dtype="float16")
    assert big.mem_mb > 26_031_728_640 / MIB  # a 13B merge needs a big-memory node
    with pytest.raises(ConfigError, match="merged dtype"):
        est.merge_lora(s, dtype="Q4_K_M")
