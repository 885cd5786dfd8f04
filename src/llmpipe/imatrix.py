"""Importance matrices (llama.cpp's ``llama-imatrix``) for the ``<TYPE>-imat`` quantizations.

- ``calibration_cut``    where the evaluation's perplexity chunks end in ``evaluate.text``: the
                         byte after their last token, found with the model's own tokenizer and
                         the evaluation's own chunking (``metrics.make_chunks``). The default
                         calibration text is what follows it, disjoint from every scored chunk.
- ``text_overlap``       passages (12 words in a row) a calibration text shares with the
                         evaluated part; a user's text that shares any gets a warning.
- ``planning_warnings``  that check before any job runs (no tokenizer yet: the evaluated part is
                         bounded by its size), for the planner to print.
- ``command``            llama-imatrix's command line.
- ``compute_imatrix``    the ``imatrix`` rule: the calibration text, llama-imatrix on the
                         reference GGUF, the matrix written atomically and its record.

Imported by the planner (``planning_warnings``): the top level stays standard library; numpy,
llama_cpp and the monitor are imported where they are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmpipe import config as cfg
from llmpipe.errors import ConfigError, PipelineError

# A shared passage: this many words in a row (case and punctuation ignored). Shorter runs occur
# by chance in any two English texts ("the terms and conditions of this"); 12 do not.
OVERLAP_WORDS = 12
# Planning has no tokenizer: the evaluated part of evaluate.text is bounded by this many bytes
# per token (English prose averages ~4 with 32-49k vocabularies; the exact check runs in the job).
PLANNING_BYTES_PER_TOKEN = 8
# Bytes of a user's calibration file read per token llama-imatrix may use (chunks x n_ctx): more
# than any vocabulary's average token, so the prefix holds them all.
MAX_BYTES_PER_TOKEN = 16
# llama-imatrix refuses a text shorter than two chunks (tools/imatrix/imatrix.cpp).
MIN_CHUNKS = 2
# The matrix is a GGUF (llama-imatrix's default format; llama-quantize reads it).
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Cut:
    """Where the evaluation's chunks end in its text: bytes ``[0, byte)`` hold every token the
    chunks score or condition on; the calibration text starts at ``byte``."""

    byte: int
    eval_tokens: int  # tokens in the chunks (n_chunk x n_ctx, BOS included)
    text_tokens: int  # tokens of the whole text
    chunks: int
    text_bytes: int


# --------------------------------------------------------------------------------------------
# The model's vocabulary (llama.cpp, no weights)
# --------------------------------------------------------------------------------------------


def load_vocab(gguf: str | os.PathLike):
    """The GGUF's tokenizer through llama_cpp (``vocab_only``: no tensor is read)."""
    import llama_cpp

    try:
        return llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as err:
        raise PipelineError(f"llama.cpp could not load the vocabulary of {gguf}: {err}") from err


def _piece(vocab, token: int) -> bytes:
    """The bytes of one token as the text spells them (special tokens render as nothing)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:  # a longer piece: -n is its length
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]


def _spelled_end(llm, data: bytes, tokens: list[int], end: int, where: str) -> int:
    """The byte of ``data`` right after ``tokens[:end]`` (``tokens`` = the tokenization of
    ``data``, BOS first when the model adds one), moved to the next character boundary."""
    from llmpipe.evaluation import llama_backend as lb

    start = 1 if tokens and tokens[0] == lb.bos_for_chunks(llm) else 0
    vocab = lb.vocab(llm)
    spelled = b"".join(_piece(vocab, t) for t in tokens[start:end])
    if data.startswith(spelled):
        byte = len(spelled)
    elif spelled[:1] == b" " and data.startswith(spelled[1:]):
        byte = len(spelled) - 1  # SentencePiece's dummy prefix: a space the text does not have
    else:
        raise PipelineError(
            f"{where}: the model's tokens do not spell the text back byte for byte, so the "
            f"end of the evaluation chunks cannot be placed in it; give quantize.imatrix.text "
            f"a calibration file of its own"
        )
    while byte < len(data) and (data[byte] & 0xC0) == 0x80:  # inside a UTF-8 character
        byte += 1
    return byte


def calibration_cut(llm, text: str, n_ctx: int, max_chunks: int | None, where: str = "") -> Cut:
    """Where the perplexity chunks of ``evaluate.text`` end, tokenized and chunked exactly as
    the llama.cpp evaluation does (``llama_backend.tokenize``, ``metrics.make_chunks``)."""
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.evaluation import metrics

    tokens = lb.tokenize(llm, text)
    try:
        chunks = metrics.make_chunks(tokens, n_ctx, max_chunks)
    except ValueError as err:
        raise ConfigError(f"evaluate.text: {where}: {err}") from err
    data = text.encode("utf-8")
    byte = _spelled_end(llm, data, tokens, chunks.size, where or "evaluate.text")
    return Cut(byte, int(chunks.size), len(tokens), len(chunks), len(data))


# --------------------------------------------------------------------------------------------
# Overlap of a calibration text with the evaluated part
# --------------------------------------------------------------------------------------------


def _passages(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def text_overlap(calibration: str, evaluated: str, n: int = OVERLAP_WORDS) -> dict:
    """Passages of ``n`` words in a row of ``calibration`` that also occur in ``evaluated``."""
    mine = _passages(calibration, n)
    shared = len(mine & _passages(evaluated, n))
    return {
        "words": n,
        "calibration_passages": len(mine),
        "shared_passages": shared,
        "shared_fraction": round(shared / len(mine), 4) if mine else 0.0,
    }


def overlap_warning(overlap: dict, text: str, eval_text: str, exact: bool = True) -> str | None:
    """The warning for a calibration text that shares passages with the evaluated part."""
    if not overlap["shared_passages"]:
        return None
    part = (
        f"the evaluation chunks of evaluate.text {eval_text}"
        if exact
        else f"evaluate.text {eval_text} where its evaluation chunks may lie (the imatrix job "
        f"checks the exact tokens)"
    )
    return (
        f"quantize.imatrix.text: {text} overlaps {part}: "
        f"{overlap['shared_passages']} of its {overlap['calibration_passages']} passages of "
        f"{overlap['words']} words also occur there ({100 * overlap['shared_fraction']:.1f} %), "
        f"so the -imat variants are scored partly on their own calibration data (null takes "
        f"the part of evaluate.text after the chunks instead)"
    )


def _read_prefix(path: Path, limit: int | None) -> str:
    with open(path, "rb") as fh:
        data = fh.read() if limit is None else fh.read(limit)
    return data.decode("utf-8", errors="ignore")


def planning_warnings(config: dict, workdir: str | os.PathLike = ".") -> list[str]:
    """The overlap warning for a user's calibration text, from the texts' sizes alone: the
    evaluated part is bounded by ``PLANNING_BYTES_PER_TOKEN`` bytes per token of its chunks,
    the calibration side by those of the chunks llama-imatrix reads. The job repeats the check
    on the exact tokens and records it."""
    section = cfg.imatrix_section(config)
    if not section["types"] or section["text"] is None:
        return []
    if not any(cfg.uses_imatrix(config, m) for m in config["models"]):
        return []
    ppl = config["evaluate"]["perplexity"]
    eval_bytes = None
    if ppl["chunks"] is not None:
        eval_bytes = ppl["chunks"] * ppl["n_ctx"] * PLANNING_BYTES_PER_TOKEN
    calib_bytes = section["chunks"] * section["n_ctx"] * PLANNING_BYTES_PER_TOKEN
    try:
        evaluated = _read_prefix(Path(workdir, config["evaluate"]["text"]), eval_bytes)
        calibration = _read_prefix(Path(workdir, section["text"]), calib_bytes)
    except OSError:
        return []  # a missing file is config.check's error
    overlap = text_overlap(calibration, evaluated)
    warning = overlap_warning(overlap, section["text"], config["evaluate"]["text"], exact=False)
    return [warning] if warning else []


# --------------------------------------------------------------------------------------------
# llama-imatrix
# --------------------------------------------------------------------------------------------


def gpu_layers_arg(n_gpu_layers: int) -> str:
    """``-ngl`` as llama.cpp's tools take it. Our -1 means every layer (llama-cpp-python's
    meaning); the tools read -1 as 'auto' (fit to free memory) and spell every layer 'all'."""
    return "all" if n_gpu_layers < 0 else str(n_gpu_layers)


def command(
    *,
    model: str | os.PathLike,
    text: str | os.PathLike,
    out: str | os.PathLike,
    n_ctx: int,
    chunks: int,
    threads: int,
    n_gpu_layers: int,
) -> list[str]:
    """llama-imatrix over ``chunks`` chunks of ``n_ctx`` tokens of ``text``. One chunk per
    batch (``-b n_ctx``: one sequence, the logits of one chunk held at a time, as planned);
    the GGUF format named explicitly (the output's name does not end in .gguf)."""
    from llmpipe.paths import llama_tool

    return [
        str(llama_tool("llama-imatrix")),
        "-m", str(model),
        "-f", str(text),
        "-o", str(out),
        "--output-format", "gguf",
        "-c", str(n_ctx),
        "-b", str(n_ctx),
        "--chunks", str(chunks),
        "-t", str(threads),
        "-ngl", gpu_layers_arg(n_gpu_layers),
    ]  # fmt: skip


def _final_ppl(tail: list[str]) -> float | None:
    """llama-imatrix's perplexity of the calibration chunks ("Final estimate: PPL = ...")."""
    for line in reversed(tail):
        match = re.search(r"Final estimate: PPL = ([0-9.]+)", line)
        if match:
            return float(match.group(1))
    return None


@contextlib.contextmanager
def _calibration_file(out: Path, data: bytes) -> Iterator[Path]:
    """The calibration text llama-imatrix reads, as a temporary file beside ``out``, removed
    afterwards (a killed job's copy by the next run, as ``atomic`` does)."""
    from llmpipe import atomic

    name = Path(out.parent, f"{out.name}.calibration")
    name.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_leftovers(name)
    fd, tmp = tempfile.mkstemp(prefix=f"{atomic.TMP_PREFIX}{name.name}.", dir=name.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _whole_characters(data: bytes) -> bytes:
    """``data`` without a UTF-8 character cut off at its end (a prefix read of a file); other
    bad bytes stay, for the decoding to report."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data":
            return data[: err.start]
    return data


def compute_imatrix(
    *,
    reference: str | os.PathLike,
    out: str | os.PathLike,
    record_path: str | os.PathLike,
    eval_text: str | os.PathLike,
    eval_n_ctx: int,
    eval_chunks: int | None,
    text: str | os.PathLike | None = None,
    n_ctx: int = 512,
    chunks: int = 100,
    threads: int = 2,
    n_gpu_layers: int = 0,
    model_id: str | None = None,
    extra: Callable[[dict], dict] | None = None,
) -> dict:
    """The importance matrix of the reference GGUF ``reference`` over the calibration text
    (``text``, or with None the part of ``eval_text`` after the evaluation chunks), written to
    ``out`` (GGUF) and described by a record at ``record_path``.

    ``extra(record)``, called just before the record is written, returns keys merged into it.
    """
    from llmpipe import atomic, provenance
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.gguf import _run_teed
    from llmpipe.manifest import sha256_file

    start = time.perf_counter()
    out = Path(out)
    llm = load_vocab(reference)
    body = Path(eval_text).read_text(encoding="utf-8")
    cut = calibration_cut(llm, body, eval_n_ctx, eval_chunks, where=str(eval_text))
    data = body.encode("utf-8")
    if text is None:
        calibration = data[cut.byte :]
        where = f"quantize.imatrix.text: null (evaluate.text {eval_text} after byte {cut.byte})"
    else:  # what llama-imatrix can read of it (a 500 MB file is never tokenized whole)
        with open(text, "rb") as fh:
            calibration = _whole_characters(fh.read(chunks * n_ctx * MAX_BYTES_PER_TOKEN))
        where = f"quantize.imatrix.text: {text}"
    try:
        tokens = lb.tokenize(llm, calibration.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text ({err})") from err
    need = MIN_CHUNKS * n_ctx
    if len(tokens) < need:
        raise ConfigError(
            f"{where}: {len(tokens)} tokens, fewer than llama-imatrix needs for two chunks of "
            f"quantize.imatrix.n_ctx={n_ctx} ({need}); give a longer text, a smaller n_ctx, or "
            f"(with null) fewer evaluate.perplexity.chunks"
        )
    used = min(chunks, len(tokens) // n_ctx)
    overlap, warning = None, None
    if text is not None:  # the part llama-imatrix reads against the part the evaluation scores
        read = _spelled_end(llm, calibration, tokens, used * n_ctx, where)
        overlap = text_overlap(calibration[:read].decode("utf-8"), data[: cut.byte].decode("utf-8"))
        warning = overlap_warning(overlap, str(text), str(eval_text))
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    del llm
    with (
        _calibration_file(out, calibration) as calib_file,
        atomic.atomic_path(out) as tmp,
    ):
        cmd = command(
            model=reference,
            text=calib_file,
            out=tmp,
            n_ctx=n_ctx,
            chunks=used,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
        )
        print("running:", " ".join(cmd), file=sys.stderr, flush=True)
        rc, tail = _run_teed(cmd)
        if rc != 0:
            last = next((line for line in reversed(tail) if line.strip()), "")
            raise PipelineError(f"llama-imatrix failed on {reference} (exit {rc}): {last}")
        with open(tmp, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise PipelineError(f"llama-imatrix wrote no GGUF matrix for {reference}")
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        names = {str(tmp): str(out), str(calib_file): "<calibration text>"}
        cmd = [names.get(arg, arg) for arg in cmd]  # as recorded: no temporary names
    record = {
        "model": model_id,
        "imatrix": str(out),
        "sha256": digest,
        "size_bytes": size,
        "reference": str(reference),
        "calibration": {
            "text": str(text) if text is not None else str(eval_text),
            "default": text is None,
            "from_byte": cut.byte if text is None else 0,
            "sha256": hashlib.sha256(calibration).hexdigest(),  # of the bytes given to the tool
            "bytes": len(calibration),
            "file_bytes": Path(text if text is not None else eval_text).stat().st_size,
            "tokens": len(tokens),
            "n_ctx": n_ctx,
            "chunks": used,
            "ppl": _final_ppl(tail),
        },
        "evaluation": {"text": str(eval_text), "n_ctx": eval_n_ctx, **asdict(cut)},
        "overlap": overlap,
        "warning": warning,
        "command": cmd,
        "threads": threads,
        "n_gpu_layers": n_gpu_layers,
        "seconds": round(time.perf_counter() - start, 3),
        "provenance": provenance.collect(),
    }
    if extra is not None:
        record.update(extra(record))
    atomic.write_json(record_path, record)
    print(
        f"imatrix of {reference}: {used} chunks x {n_ctx} tokens of {record['calibration']['text']}"
        f" (from byte {record['calibration']['from_byte']}), {size} bytes",
        file=sys.stderr,
    )
    return record
