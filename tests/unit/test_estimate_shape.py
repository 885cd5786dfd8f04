"""ModelShape from the published config.json files (tests/fixtures/model_configs), against
hand-computed parameter counts, and the bytes of weights, KV cache and activations."""

from __future__ import annotations

import json
import math

import pytest
from helpers import REPO

from llmpipe.errors import ConfigError
from llmpipe.estimate import (
    MIB,
    ModelShape,
    bits_per_weight,
    bytes_per_weight,
    gguf_bytes,
    weights_bytes,
)

FIXTURES = REPO / "tests" / "fixtures" / "model_configs"


def shape(name: str) -> ModelShape:
    return ModelShape.from_config(FIXTURES / f"{name}.json")


# ---- parameter counts ----------------------------------------------------------------------


def test_llama_2_7b_param_count():
    # embedding 32000*4096 = 131,072,000; lm_head (untied) the same
    # per layer: q,k,v,o 4*4096^2 = 67,108,864; gate,up,down 3*4096*11008 = 135,266,304;
    #            2 RMSNorms 2*4096 = 8,192                    -> 202,383,360
    # 32 layers = 6,476,267,520; + final norm 4,096 + 262,144,000 = 6,738,415,616
    s = shape("llama-2-7b")
    assert s.n_params == 6_738_415_616
    assert s.param_breakdown() == {
        "embedding": 131_072_000,
        "attention": 32 * 67_108_864,
        "mlp": 32 * 135_266_304,
        "norms": 65 * 4096,
        "lm_head": 131_072_000,
    }


def test_llama_2_13b_param_count():
    # per layer: 4*5120^2 = 104,857,600 + 3*5120*13824 = 212,336,640 + 2*5120 = 317,204,480
    # 40 layers = 12,688,179,200; + 2*32000*5120 = 327,680,000 + final norm 5,120
    assert shape("llama-2-13b").n_params == 13_015_864_320


def test_mistral_7b_param_count():
    # GQA: 8 KV heads x 128 = 1024-wide K and V
    # per layer: q,o 2*4096^2 = 33,554,432; k,v 2*4096*1024 = 8,388,608;
    #            mlp 3*4096*14336 = 176,160,768; norms 8,192 -> 218,112,000
    # 32 layers = 6,979,584,000; + 262,144,000 (embedding + lm_head) + 4,096
    s = shape("mistral-7b-v0.1")
    assert (s.n_kv_heads, s.head_dim, s.kv_dim) == (8, 128, 1024)
    assert s.n_params == 7_241_732_096


def test_falcon_7b_param_count():
    # multi-query: 71 heads x 64, one K and one V head -> query_key_value out 4544 + 2*64 = 4672
    # per layer: qkv 4544*4672 = 21,229,568; dense 4544^2 = 20,647,936;
    #            h_to_4h + 4h_to_h 2*4544*18176 = 165,183,488; one LayerNorm (w+b) 9,088
    #            -> 207,070,080; 32 layers = 6,626,242,560
    # embedding 65024*4544 = 295,469,056, tied lm_head; ln_f 9,088
    s = shape("falcon-7b")
    assert (s.n_kv_heads, s.head_dim, s.ffn, s.tied_embeddings) == (1, 64, 18176, True)
    assert s.norms_per_layer == 1  # parallel_attn: input_layernorm only
    assert s.n_params == 6_921_720_704


def test_falcon_7b_old_refinedwebmodel_keys_give_the_same_shape():
    new, old = shape("falcon-7b"), shape("falcon-7b-refinedwebmodel")
    assert old.model_type == "RefinedWebModel"
    assert old.n_params == new.n_params == 6_921_720_704
    assert (old.n_layers, old.n_heads, old.n_kv_heads, old.context) == (32, 71, 1, 2048)


def test_falcon_rw_1b_param_count_with_biases_and_two_norms():
    # bias=true, multi_query=false, parallel_attn=false (two LayerNorms per layer), ALiBi
    # per layer: qkv 2048*6144 + 6144 = 12,589,056; dense 2048^2 + 2048 = 4,196,352;
    #            h_to_4h 2048*8192 + 8192 = 16,785,408; 4h_to_h 8192*2048 + 2048 = 16,779,264;
    #            2 LayerNorms 2*2*2048 = 8,192 -> 50,358,272; 24 layers = 1,208,598,528
    # embedding 50304*2048 = 103,022,592 (tied) + ln_f 4,096
    s = shape("falcon-rw-1b")
    assert s.alibi and s.norms_per_layer == 2
    assert s.n_params == 1_311_625_216


def test_smollm2_135m_param_count():
    # 9 heads / 3 KV heads of 64; per layer: q,o 2*576^2 = 663,552; k,v 2*576*192 = 221,184;
    # mlp 3*576*1536 = 2,654,208; norms 1,152 -> 3,540,096; 30 layers = 106,202,880
    # embedding 49152*576 = 28,311,552 (tied) + final norm 576
    s = shape("smollm2-135m")
    assert s.n_params == 134_515_008
    assert s.matmul_params == 134_515_008  # tied lm_head multiplies by the embedding matrix


def test_from_dict_and_folder(tmp_path):
    data = json.loads((FIXTURES / "llama-2-7b.json").read_text())
    assert ModelShape.from_config(data).n_params == 6_738_415_616
    folder = tmp_path / "Llama-2-7b-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    s = ModelShape.from_config(folder)
    assert s.name == "Llama-2-7b-hf" and s.n_params == 6_738_415_616


# ---- config errors -------------------------------------------------------------------------


def test_missing_key_names_file_and_key(tmp_path):
    data = json.loads((FIXTURES / "llama-2-7b.json").read_text())
    del data["hidden_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config\.json.*'hidden_size'") as info:
        ModelShape.from_config(path)
    assert isinstance(info.value, ConfigError)
    assert str(path) in str(info.value)


def test_bad_value_and_missing_file(tmp_path):
    data = json.loads((FIXTURES / "mistral-7b-v0.1.json").read_text())
    data["num_key_value_heads"] = 0
    with pytest.raises(ValueError, match="'num_key_value_heads' must be a positive integer"):
        ModelShape.from_config(data)
    with pytest.raises(ConfigError, match="not found"):
        ModelShape.from_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: cannot read"):
        ModelShape.from_config(tmp_path / "bad.json")


# ---- bytes per weight and weight sizes -----------------------------------------------------


def test_bytes_per_weight_block_layouts():
    assert bytes_per_weight("f32") == 4 and bytes_per_weight("fp16") == 2
    assert bytes_per_weight("bfloat16") == 2
    assert bits_per_weight("Q8_0") == 8.5  # (2 + 32) B / 32
    assert bits_per_weight("q4_0") == 4.5  # (2 + 16) B / 32
    assert bits_per_weight("Q4_1") == 5.0  # (2 + 2 + 16) B / 32
    assert bits_per_weight("Q6_K") == 6.5625  # 210 B / 256
    assert bits_per_weight("IQ4_XS") == 4.25  # 136 B / 256
    assert bits_per_weight("Q4_K_M") == pytest.approx(4.85, abs=0.02)  # mixed: file average
    assert bits_per_weight("Q5_K_M") == pytest.approx(5.68)
    assert bits_per_weight("Q4_K") == bits_per_weight("Q4_K_M")
    assert bits_per_weight("nf4") == pytest.approx(4.127)  # 4 + 8/64 + 32/(64*256)
    assert bits_per_weight("int8") == 8
    with pytest.raises(ConfigError, match="unknown dtype/quant type 'q9_9'"):
        bytes_per_weight("q9_9")


def test_weight_bytes_per_dtype_llama_2_7b():
    s = shape("llama-2-7b")
    assert weights_bytes(s, "f16") == 6_738_415_616 * 2 == 13_476_831_232
    assert weights_bytes(s, "f32") == 6_738_415_616 * 4
    # GGUF keeps the 65 * 4096 = 266,240 norm weights in f32, the rest at the type's width
    matrices = 6_738_415_616 - 266_240
    assert gguf_bytes(s, "f16") == matrices * 2 + 266_240 * 4 == 13_477_363_712
    assert gguf_bytes(s, "Q8_0") == matrices * 17 // 16 + 266_240 * 4 == 7_160_348_672
    assert gguf_bytes(s, "Q4_0") == matrices * 9 // 16 + 266_240 * 4 == 3_791_273_984


def test_weight_bytes_nf4_keeps_embeddings_in_f16():
    s = shape("llama-2-13b")
    # decoder linears: 40 * (104,857,600 + 212,336,640) = 12,687,769,600 at 4.127 bits
    # the rest (embedding, lm_head, norms) 13,015,864,320 - 12,687,769,600 = 328,094,720 in f16
    assert s.linear_params == 12_687_769_600
    assert weights_bytes(s, "nf4") == math.ceil(12_687_769_600 * 4.127 / 8) + 328_094_720 * 2


# ---- KV cache --------------------------------------------------------------------------------


def test_kv_cache_llama_2_7b_fp16_full_context_is_2_gib():
    # 2 (K,V) * 32 layers * 4096 (32 heads x 128) * 4096 tokens * 2 B = 2 GiB
    assert shape("llama-2-7b").kv_cache_bytes(4096) == 2 * 32 * 4096 * 4096 * 2 == 2 * 1024**3


def test_kv_cache_gqa_and_multi_query():
    llama = shape("llama-2-7b").kv_cache_bytes(4096)
    # Mistral: 8 KV heads x 128 = 1024 -> 2*32*1024*4096*2 = 512 MiB
    assert shape("mistral-7b-v0.1").kv_cache_bytes(4096) == 512 * MIB
    # Falcon-7B: one KV head of 64 -> 2*32*64*4096*2 = 32 MiB, 1/64 of Llama-2-7B
    falcon = shape("falcon-7b").kv_cache_bytes(4096)
    assert falcon == 2 * 32 * 64 * 4096 * 2 == 32 * MIB
    assert falcon * 64 == llama
    # batch and element size scale linearly
    assert (
        shape("llama-2-7b").kv_cache_bytes(100, batch=3, bytes_per_elem=4)
        == 2 * 32 * 4096 * 300 * 4
    )


# ---- activations -----------------------------------------------------------------------------


def test_training_activations_per_token_per_layer():
    # Llama-2-7B, b=2: RMSNorms 2*(4*4096 + 2*2*4096) = 65,536; SDPA q,k,v,out 2*(4*4096) =
    # 32,768; gated MLP 4*2*11008 = 88,064 -> 186,368 B
    assert shape("llama-2-7b").training_activation_bytes_per_token_layer(2) == 186_368
    # Falcon-RW-1B, b=2: 2 LayerNorms 2*2*2*2048 = 16,384; attention 2*(4*2048 + 2*2048) =
    # 24,576; MLP 2*2*8192 = 32,768 -> 73,728 B (ALiBi mask is per forward, not per layer)
    assert shape("falcon-rw-1b").training_activation_bytes_per_token_layer(2, 2048) == 73_728
    # Falcon-7B's multi-query attention falls back to math SDPA: + 71 heads * 2048 * 4 B
    f7 = shape("falcon-7b")
    assert f7.sdpa_math_fallback
    base = 2 * 2 * 4544 + 2 * (4 * 4544 + 2 * 64) + 2 * 2 * 18176  # 18,176 + 36,608 + 72,704
    assert f7.training_activation_bytes_per_token_layer(2, 2048) == base + 71 * 2048 * 4


def test_lora_params():
    # Llama-2-7B r=16, all linears: q,k,v,o 4*16*(4096+4096) = 524,288;
    # gate,up 2*16*(4096+11008) = 483,328; down 16*(11008+4096) = 241,664 -> 1,249,280 x 32
    s = shape("llama-2-7b")
    assert s.lora_params(16) == 1_249_280 * 32 == 39_976_960
    assert s.lora_params(8, "qv") == 32 * 2 * 8 * 8192
    with pytest.raises(ConfigError, match="lora targets"):
        s.lora_params(16, "everything")
