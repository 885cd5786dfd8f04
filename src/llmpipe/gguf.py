"""convert_to_gguf and quantize, both with the pinned llama.cpp (llama-cpp-python 0.3.36).

- Conversion runs llama.cpp's official ``convert_hf_to_gguf.py`` from the same sdist the runtime
  was built from (``LLAMA_CPP_DIR``), with that tree's own ``gguf-py``: converter and runtime
  always agree on the format.
- Quantization calls ``llama_model_quantize`` in-process (the library llama-quantize wraps).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

from llmpipe import atomic, provenance
from llmpipe.errors import ConfigError, IntegrityError, PipelineError
from llmpipe.manifest import sha256_file
from llmpipe.paths import LLAMA_CPP_DIR

GGUF_MAGIC = b"GGUF"


def converter_script(llama_cpp_dir: Path = LLAMA_CPP_DIR) -> Path:
    script = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise PipelineError(
            f"llama.cpp converter not found at {script} (run `make setup`, or set "
            f"LLMPIPE_LLAMA_CPP_DIR to a llama.cpp tree matching llama-cpp-python's version)"
        )
    return script


def gguf_info(path: str | os.PathLike) -> dict:
    """Parse a GGUF's header and tensor table: parameter count, tensor bytes, bits per weight.

    Raises IntegrityError when the file is not a GGUF or is truncated.
    """
    from gguf import GGUFReader

    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise IntegrityError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise IntegrityError(f"{path}: corrupt or truncated GGUF ({err})") from err
    size = path.stat().st_size
    n_params = 0
    n_bytes = 0
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        end = tensor.data_offset + int(tensor.n_bytes)
        if end > size:
            raise IntegrityError(
                f"{path}: truncated GGUF (tensor {tensor.name} ends at byte {end}, file has {size})"
            )
        n_params += int(tensor.n_elements)
        n_bytes += int(tensor.n_bytes)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    return {
        "architecture": arch,
        "n_tensors": len(reader.tensors),
        "n_params": n_params,
        "tensor_bytes": n_bytes,
        "size_bytes": size,
        "bits_per_weight": round(8 * n_bytes / n_params, 4) if n_params else None,
        "tensor_types": types,
    }


def convert_hf_to_gguf(
    hf_dir: str | os.PathLike,
    out_gguf: str | os.PathLike,
    outtype: str,
    record_path: str | os.PathLike,
    source_record: dict | None = None,
) -> dict:
    """Convert an HF folder to ``out_gguf`` with the official converter; write a record."""
    script = converter_script()
    start = time.perf_counter()
    with atomic.atomic_path(out_gguf) as tmp:
        cmd = [
            sys.executable,
            str(script),
            str(hf_dir),
            "--outfile",
            str(tmp),
            "--outtype",
            outtype,
        ]
        print("running:", " ".join(cmd), file=sys.stderr, flush=True)
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if done.returncode != 0:
            raise PipelineError(
                f"llama.cpp converter failed on {hf_dir} (exit {done.returncode}); its messages "
                f"are above in this log (an architecture it does not support says so there)"
            )
        info = gguf_info(tmp)
        digest = sha256_file(tmp)
    record = {
        "variant": outtype.upper(),
        "gguf": str(out_gguf),
        **info,
        "sha256": digest,
        "seconds": round(time.perf_counter() - start, 3),
        "converter": str(script),
        "staged_input": source_record,
        "provenance": provenance.collect(),
    }
    atomic.write_json(record_path, record)
    return record


def ftype_constant(quant: str) -> int:
    """The LLAMA_FTYPE_* value llama_model_quantize takes for a llama-quantize type name."""
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if quant == "F32" else f"LLAMA_FTYPE_MOSTLY_{quant}"
    if not hasattr(llama_cpp, name):
        raise ConfigError(f"quantize.types: llama.cpp has no type '{quant}' ({name} not found)")
    return getattr(llama_cpp, name)


def quantize_gguf(
    src_gguf: str | os.PathLike,
    out_gguf: str | os.PathLike,
    quant: str,
    threads: int,
    record_path: str | os.PathLike,
) -> dict:
    """Quantize ``src_gguf`` to ``quant`` in-process; write the GGUF atomically and a record."""
    import llama_cpp

    src_info = gguf_info(src_gguf)  # refuse a truncated input before spending minutes on it
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_constant(quant)
    params.nthread = threads
    start = time.perf_counter()
    with atomic.atomic_path(out_gguf) as tmp:
        rc = llama_cpp.llama_model_quantize(
            str(src_gguf).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise PipelineError(f"llama_model_quantize {src_gguf} -> {quant} failed (rc={rc})")
        info = gguf_info(tmp)
        digest = sha256_file(tmp)
    record = {
        "variant": quant,
        "gguf": str(out_gguf),
        **info,
        "sha256": digest,
        "seconds": round(time.perf_counter() - start, 3),
        "threads": threads,
        "source": {"gguf": str(src_gguf), "size_bytes": src_info["size_bytes"]},
        "compression_ratio": round(src_info["size_bytes"] / info["size_bytes"], 4),
        "provenance": provenance.collect(),
    }
    atomic.write_json(record_path, record)
    return record
