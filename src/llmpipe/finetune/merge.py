"""The tuned model as a model of its own: the adapter merged into the base, and as a GGUF adapter.

``merge_adapter`` writes ``results/models/<base>-ft/hf`` (safetensors + tokenizer + chat
template) and its ``manifest.json`` in the format ``llmpipe.fetch`` writes for downloaded
models, so convert_to_gguf, quantize and evaluate take the tuned model like any other.

``adapter_to_gguf`` converts the PEFT adapter with llama.cpp's ``convert_lora_to_gguf.py`` from
the pinned tree (the same source as the runtime): llama.cpp then applies it to the base GGUF at
load time (``--lora`` / ``Llama(lora_path=…)``) without a merged copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmpipe import atomic, manifest, provenance
from llmpipe.errors import PipelineError
from llmpipe.fetch import check_hf_folder
from llmpipe.paths import LLAMA_CPP_DIR

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def merge_adapter(
    base_hf: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_hf: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    model_id: str,
    base_id: str,
    dtype: str = "float16",
    base_manifest: str | os.PathLike | None = None,
    extra: Callable[[dict], dict] | None = None,
) -> dict:
    """Merge ``adapter_dir`` into ``base_hf``; write ``out_hf`` and its manifest atomically.

    ``extra(record)``, called just before the manifest is written, returns keys merged into it
    (the job's predicted and measured resources, as the download's manifest has them).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.dtype = dtype
    adapter_dir = Path(adapter_dir)
    with atomic.atomic_dir(out_hf) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        # The tokenizer trained with: the adapter folder's when training set a fallback chat
        # template, else the base model's files unchanged.
        source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_hf
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, tmp / name)
        check_hf_folder(tmp)
        files = manifest.build(tmp)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    origin = {
        "kind": "finetune",
        "base": base_id,
        "base_fingerprint": (
            manifest.load(base_manifest).get("fingerprint") if base_manifest else None
        ),
        "adapter": str(adapter_dir),
        "adapter_sha256": manifest.sha256_file(adapter_dir / "adapter_model.safetensors"),
        "peft_type": adapter_config.get("peft_type"),
        "r": adapter_config.get("r"),
        "dtype": dtype,
    }
    return manifest.write_model_record(
        manifest_path,
        model_id=model_id,
        origin=origin,
        folder=out_hf,
        files=files,
        seconds=time.perf_counter() - start,
        extra=extra,
    )


def lora_converter(llama_cpp_dir: Path = LLAMA_CPP_DIR) -> Path:
    script = Path(llama_cpp_dir) / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise PipelineError(
            f"llama.cpp's convert_lora_to_gguf.py not found at {script} (run `make setup`, or "
            f"set LLMPIPE_LLAMA_CPP_DIR to the llama.cpp tree matching llama-cpp-python)"
        )
    return script


def adapter_to_gguf(
    adapter_dir: str | os.PathLike,
    base_hf: str | os.PathLike,
    out_gguf: str | os.PathLike,
    record_path: str | os.PathLike,
    outtype: str = "f16",
) -> dict:
    """Convert a PEFT LoRA adapter to a GGUF adapter with the pinned llama.cpp converter."""
    from llmpipe.architectures import converter_input
    from llmpipe.gguf import gguf_info

    script = lora_converter()
    start = time.perf_counter()
    # the LoRA converter reads the base's config.json the way the model converter does
    with converter_input(base_hf) as (base_dir, config_fixes), atomic.atomic_path(out_gguf) as tmp:
        cmd = [
            sys.executable,
            str(script),
            "--base",
            str(base_dir),
            "--outfile",
            str(tmp),
            "--outtype",
            outtype,
            str(adapter_dir),
        ]
        print("running:", " ".join(cmd), file=sys.stderr, flush=True)
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if done.returncode != 0:
            raise PipelineError(
                f"llama.cpp's LoRA converter failed on {adapter_dir} (exit {done.returncode}); "
                f"its messages are above in this log"
            )
        info = gguf_info(tmp)
        digest = manifest.sha256_file(tmp)
    record = {
        "gguf": str(out_gguf),
        "adapter": str(adapter_dir),
        "base": str(base_hf),
        "converter_config_fixes": config_fixes,
        "outtype": outtype,
        **info,
        "sha256": digest,
        "seconds": round(time.perf_counter() - start, 3),
        "converter": str(script),
        "provenance": provenance.collect(),
    }
    atomic.write_json(record_path, record)
    return record
