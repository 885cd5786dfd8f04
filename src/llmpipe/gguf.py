"""convert_to_gguf and quantize, both with the pinned llama.cpp (llama-cpp-python 0.3.36).

- Conversion runs llama.cpp's official ``convert_hf_to_gguf.py`` from the same sdist the runtime
  was built from (``LLAMA_CPP_DIR``), with that tree's own ``gguf-py``: converter and runtime
  always agree on the format.
- Quantization calls ``llama_model_quantize`` in-process (the library llama-quantize wraps);
  with an importance matrix (the ``<TYPE>-imat`` variants) it runs llama.cpp's own
  ``llama-quantize --imatrix`` from the same pinned build.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmpipe import architectures, atomic, provenance
from llmpipe.config import IMATRIX_SUFFIX, IMATRIX_TYPES
from llmpipe.errors import ConfigError, IntegrityError, PipelineError, ResourceError
from llmpipe.manifest import sha256_file
from llmpipe.paths import LLAMA_CPP_DIR, llama_tool

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
    extra: Callable[[dict], dict] | None = None,
) -> dict:
    """Convert an HF folder to ``out_gguf`` with the official converter; write a record.

    ``extra(record)``, called just before the record is written, returns keys merged into it.
    """
    script = converter_script()
    start = time.perf_counter()
    with (
        architectures.converter_input(hf_dir) as (converter_dir, config_fixes),
        atomic.atomic_path(out_gguf) as tmp,
    ):
        if config_fixes:
            print(f"converter reads a corrected config.json: {config_fixes}", file=sys.stderr)
        cmd = [
            sys.executable,
            str(script),
            str(converter_dir),
            "--outfile",
            str(tmp),
            "--outtype",
            outtype,
        ]
        print("running:", " ".join(cmd), file=sys.stderr, flush=True)
        rc, tail = _run_teed(cmd)
        if rc != 0:
            raise PipelineError(_converter_failure(Path(hf_dir), rc, tail))
        info = gguf_info(tmp)
        digest = sha256_file(tmp)
    record = {
        "variant": outtype.upper(),
        "gguf": str(out_gguf),
        **info,
        "sha256": digest,
        "seconds": round(time.perf_counter() - start, 3),
        "converter": str(script),
        "converter_config_fixes": config_fixes,
        "staged_input": source_record,
        "provenance": provenance.collect(),
    }
    if extra is not None:
        record.update(extra(record))
    atomic.write_json(record_path, record)
    return record


def _run_teed(cmd: list[str], keep: int = 60) -> tuple[int, list[str]]:
    """Run ``cmd``, copying its output to our stderr (the rule log); return rc and the tail."""
    tail: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            tail = [*tail[-keep + 1 :], line.rstrip()]
    return proc.returncode, tail


def _converter_failure(hf_dir: Path, rc: int, tail: list[str]) -> str:
    text = "\n".join(tail)
    if "not supported" in text and ("Architecture" in text or "Model " in text):
        try:
            archs = json.loads((hf_dir / "config.json").read_text()).get("architectures")
        except (OSError, ValueError):
            archs = None
        return (
            f"{hf_dir}/config.json: architecture {archs} is not supported by the pinned "
            f"llama.cpp converter (llama-cpp-python 0.3.36); such a model can still be "
            f"evaluated with the transformers backend"
        )
    if "No space left on device" in text:
        return f"converter ran out of disk space writing the GGUF from {hf_dir}"
    last = next((line for line in reversed(tail) if line.strip()), "")
    return f"llama.cpp converter failed on {hf_dir} (exit {rc}): {last}"


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
    extra: Callable[[dict], dict] | None = None,
    imatrix: str | os.PathLike | None = None,
) -> dict:
    """Quantize ``src_gguf`` to ``quant``; write the GGUF atomically and a record.

    Without ``imatrix`` in-process (``llama_model_quantize``); with one (the ``<quant>-imat``
    variant) through ``llama-quantize --imatrix``. ``extra(record)``, called just before the
    record is written, returns keys merged into it.
    """
    if quant in IMATRIX_TYPES and imatrix is None:
        raise ConfigError(
            f"quantize.types: '{quant}' needs an importance matrix: list it under "
            f"quantize.imatrix.types instead (llama.cpp refuses it, or writes garbage, without)"
        )
    src_info = gguf_info(src_gguf)  # refuse a truncated input before spending minutes on it
    start = time.perf_counter()
    with atomic.atomic_path(out_gguf) as tmp:
        if imatrix is None:
            rc = _quantize_in_process(src_gguf, tmp, quant, threads)
        else:
            rc = _quantize_with_imatrix(src_gguf, tmp, quant, threads, imatrix)
        if rc != 0:
            free = shutil.disk_usage(Path(out_gguf).parent).free
            if free < 16 * 2**20:  # the partial output is still there: a full disk reads ~0
                raise ResourceError(
                    f"{out_gguf}: the disk is full ({free / 1e9:.2f} GB free) while quantizing "
                    f"to {quant}; nothing was written under this name. Free space and rerun"
                )
            how = "llama-quantize --imatrix" if imatrix is not None else "llama_model_quantize"
            raise PipelineError(
                f"{how} {src_gguf} -> {quant} failed (rc={rc}); llama.cpp's reason is above in "
                f"this log"
            )
        info = gguf_info(tmp)
        digest = sha256_file(tmp)
    record = {
        "variant": f"{quant}{IMATRIX_SUFFIX}" if imatrix is not None else quant,
        "type": quant,
        "gguf": str(out_gguf),
        **info,
        "sha256": digest,
        "seconds": round(time.perf_counter() - start, 3),
        "threads": threads,
        "source": {"gguf": str(src_gguf), "size_bytes": src_info["size_bytes"]},
        "imatrix": (
            {"path": str(imatrix), "sha256": sha256_file(imatrix)} if imatrix is not None else None
        ),
        "compression_ratio": round(src_info["size_bytes"] / info["size_bytes"], 4),
        "provenance": provenance.collect(),
    }
    if extra is not None:
        record.update(extra(record))
    atomic.write_json(record_path, record)
    return record


def _quantize_in_process(src_gguf, tmp: Path, quant: str, threads: int) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_constant(quant)
    params.nthread = threads
    return llama_cpp.llama_model_quantize(
        str(src_gguf).encode(), str(tmp).encode(), ctypes.byref(params)
    )


def _quantize_with_imatrix(src_gguf, tmp: Path, quant: str, threads: int, imatrix) -> int:
    """llama-quantize --imatrix. The in-process call cannot take the matrix from Python: its
    parameters want it as C structs that llama.cpp fills from the file with the tools' own
    reader (common/imatrix-loader: GGUF and legacy formats, entry and chunk-count checks),
    which is part of neither libllama nor the binding; the tool uses that very reader."""
    ftype_constant(quant)  # an unknown type fails here with the config key, not in the tool
    cmd = [
        str(llama_tool("llama-quantize")),
        "--imatrix", str(imatrix),
        str(src_gguf), str(tmp), quant, str(threads),
    ]  # fmt: skip
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    rc, _ = _run_teed(cmd)
    return rc
