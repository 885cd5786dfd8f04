"""The transformers backend: one model load, every prompt of the job generated in batches.

Not the seed's loop (model moved to the device and one prompt generated per iteration): prompts
are sorted by length and generated ``batch_size`` at a time with left padding and attention
masks, under ``torch.inference_mode``, by a decode loop that drops a sequence from the batch
(and its KV cache rows) as soon as it ends, so no step is spent on finished sequences. The
forward passes go through a decoder (``decoders``: transformers' own forward, or the packed CPU
decoder for Llama-family models in fp32). Sampling: transformers' repetition penalty and top-p
warpers; temperature and top-k on the k best logits only. dtype/device from config: fp16 on
CUDA (V100 has no bf16), fp32 on CPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from llmpipe.errors import ConfigError, ResourceError
from llmpipe.evaluation.records import PromptResult, Sampling, choose_threads

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class HFSettings:
    """Config ``evaluate.transformers``."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    attn_implementation: str = "sdpa"
    tune_threads: bool = True
    cpu_packed_decode: bool = True
    cpu_matmul: str = "auto"
    threads: int = 2

    @classmethod
    def from_config(cls, section: dict, threads: int) -> HFSettings:
        values = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        values["threads"] = threads
        settings = cls(**values)
        if settings.device not in DEVICES:
            raise ConfigError(f"evaluate.transformers.device: '{settings.device}' not in {DEVICES}")
        if settings.dtype not in DTYPES:
            raise ConfigError(f"evaluate.transformers.dtype: '{settings.dtype}' not in {DTYPES}")
        return settings

    @property
    def uses_gpu(self) -> bool:
        return self.device == "cuda"

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(settings: HFSettings) -> tuple[str, str]:
    """(device, dtype name): auto = CUDA when present; fp16 on CUDA, fp32 on CPU."""
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ResourceError(
            "evaluate.transformers.device is 'cuda' but torch sees no GPU (run the job on a GPU "
            "node, or set device: cpu)"
        )
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, dtype


def load(hf_dir, settings: HFSettings):
    """(model, tokenizer, device, dtype name), the model in eval mode on its device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(settings.threads)
    device, dtype = resolve(settings)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype), attn_implementation=settings.attn_implementation
    )
    model.to(device).eval()
    return model, tokenizer, device, dtype


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(model, tokenizer, device: str) -> None:
    """One tiny forward pass so kernels and weights are ready before anything is timed."""
    import torch

    ids = tokenizer("Hello", return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    synchronize(device)


def tune_threads(
    decoder, tokenizer, device: str, threads: int, rows: int, rounds: int = 3, steps: int = 3
) -> dict:
    """On the CPU, time decode steps of a ``rows``-wide batch with ``threads`` threads and with
    one, alternating ``rounds`` times, and keep one thread only if it is clearly faster
    (``choose_threads``). torch's thread pool spins at every barrier; when another process holds
    a core (a shared node, a busy laptop) two threads can be many times slower than one.
    Returns the choice and the best step times (recorded in the eval JSON)."""
    import torch

    if device != "cpu" or threads <= 1:
        return {"threads_used": threads, "step_s": {}}
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    ids = ids.repeat(max(rows, 1), 1)
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    step_s = {threads: float("inf"), 1: float("inf")}
    with torch.inference_mode():
        for _ in range(rounds):
            for candidate in (threads, 1):
                torch.set_num_threads(candidate)
                decoder.start(ids, mask, positions, ids.shape[1] + steps)
                for pos in range(ids.shape[1], ids.shape[1] + steps):
                    start = time.perf_counter()
                    decoder.step(ids[:, -1], torch.full((ids.shape[0],), pos))
                    step_s[candidate] = min(step_s[candidate], time.perf_counter() - start)
    step_s = {k: round(v, 5) for k, v in step_s.items()}
    chosen = choose_threads(step_s, threads)
    torch.set_num_threads(chosen)
    return {"threads_used": chosen, "step_s": step_s}


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(x) for x in source)
    return ids


def pad_id(model, tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id):
        if isinstance(candidate, int):
            return candidate
    return min(eos_ids(model, tokenizer) or {0})


def tokenize(tokenizer, text: str) -> list[int]:
    """As transformers tokenizes a prompt: with the special tokens the tokenizer adds."""
    return list(tokenizer(text, add_special_tokens=True).input_ids)


def bos_for_chunks(tokenizer) -> int | None:
    """BOS when the tokenizer adds one (it then goes first in every perplexity chunk)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    return bos if with_special and with_special[0] == bos else None


def _penalty(sampling: Sampling):
    """transformers' repetition penalty processor, or None when it is off."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    if sampling.repetition_penalty == 1.0:
        return None
    return RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)


def _next_tokens(logits, seqs, sampling: Sampling, penalty, generator):
    """One token per row: the repetition penalty, then the argmax (greedy) or temperature,
    top-k, top-p and a draw. With top-k only the k best logits go on (the softmax over the
    survivors is the softmax over the masked vocabulary); top-p is transformers' warper."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    if penalty is not None:
        logits = penalty(seqs, logits)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if sampling.top_k > 0:
        scores, index = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1)
    else:
        scores, index = logits, None
    scores = scores / sampling.temperature
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(seqs, scores)
    if index is None:
        return _sample(scores, generator)
    pick = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
    return index.gather(-1, pick).squeeze(1)


def _sample(scores, generator):
    """One token per row from softmax(scores) over the whole vocabulary. After top-p most
    scores are -inf: draw among the survivors only (a multinomial over the whole vocabulary
    costs ~1 ms per row)."""
    import torch

    alive = int(torch.isfinite(scores).sum(dim=-1).max())
    if alive < scores.shape[-1]:
        top, index = scores.topk(alive, dim=-1)
        pick = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=generator)
        return index.gather(-1, pick).squeeze(1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class BatchRecord:
    """One generation batch: its rows, the decode steps it ran and its padded prompt width."""

    rows: int
    steps: int
    width: int
    prefill_s: float
    decode_s: float


def generate(
    decoder,
    model,
    tokenizer,
    device: str,
    prompts: list[tuple[int, str]],
    sampling: Sampling,
    batch_size: int,
) -> tuple[list[PromptResult], list[BatchRecord]]:
    """All prompts, ``batch_size`` at a time (sorted by length, so padding stays small), through
    ``decoder`` (``decoders.make_decoder``)."""
    tokenized = [(index, prompt, tokenize(tokenizer, prompt)) for index, prompt in prompts]
    tokenized.sort(key=lambda item: len(item[2]))
    results: list[PromptResult] = []
    batches: list[BatchRecord] = []
    for start in range(0, len(tokenized), max(batch_size, 1)):
        part = tokenized[start : start + batch_size]
        done, record = _generate_batch(decoder, model, tokenizer, device, part, sampling)
        results.extend(done)
        batches.append(record)
    results.sort(key=lambda r: r.index)
    return results, batches


def _generate_batch(decoder, model, tokenizer, device, part, sampling: Sampling):
    import torch

    eos = eos_ids(model, tokenizer)
    pad = pad_id(model, tokenizer)
    width = max(len(ids) for _, _, ids in part)
    rows = len(part)
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, (_, _, ids) in enumerate(part):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    penalty = _penalty(sampling)
    generator = torch.Generator(device=device).manual_seed(sampling.prompt_seed(part[0][0]))
    active = torch.arange(rows, device=device)  # batch row -> index into `part`
    generated: list[list[int]] = [[] for _ in part]
    seqs = input_ids  # what the repetition penalty sees: prompt + generated, per active row
    steps = 0
    with torch.inference_mode():
        start = time.perf_counter()
        logits = decoder.start(input_ids, mask, positions, width + sampling.max_new_tokens)
        synchronize(device)
        prefilled = time.perf_counter()
        last_pos = positions[:, -1]
        while True:
            nxt = _next_tokens(logits, seqs, sampling, penalty, generator)
            nxt_list = nxt.tolist()
            finished = []
            for slot, (row, tok) in enumerate(zip(active.tolist(), nxt_list, strict=True)):
                generated[row].append(tok)
                if tok in eos or len(generated[row]) >= sampling.max_new_tokens:
                    finished.append(slot)
            if len(finished) == len(nxt_list):
                break
            if finished:
                gone = set(finished)
                keep = torch.tensor(
                    [s for s in range(len(nxt_list)) if s not in gone], device=device
                )
                decoder.keep(keep)
                active, nxt = active[keep], nxt[keep]
                seqs, last_pos = seqs[keep], last_pos[keep]
            last_pos = last_pos + 1
            if penalty is not None:
                seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            logits = decoder.step(nxt, last_pos)
            steps += 1
        synchronize(device)
        finished_at = time.perf_counter()
    prefill_s, decode_s = prefilled - start, finished_at - prefilled
    results = []
    total_decode = sum(max(len(g) - 1, 0) for g in generated) or 1
    for row, (index, prompt, ids) in enumerate(part):
        toks = generated[row]
        stop = "eos" if toks and toks[-1] in eos else "length"
        text_ids = toks[:-1] if stop == "eos" else toks
        results.append(
            PromptResult(
                index=index,
                prompt=prompt,
                prompt_tokens=len(ids),
                token_ids=toks,
                text=tokenizer.decode(text_ids, skip_special_tokens=True),
                # A batch's time, shared by its rows in proportion to their tokens.
                prefill_s=prefill_s * len(ids) / sum(len(p[2]) for p in part),
                decode_s=decode_s * max(len(toks) - 1, 0) / total_decode,
                stop=stop,
            )
        )
    return results, BatchRecord(rows, steps, width, prefill_s, decode_s)


def chunk_logits(model, device: str, chunk_input: np.ndarray, first: int) -> np.ndarray:
    """Logits (float32) at positions ``first`` .. ``n_ctx - 2`` of one chunk, one pass."""
    import torch

    n_ctx = len(chunk_input)
    ids = torch.as_tensor(np.asarray(chunk_input, dtype=np.int64))[None].to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=False, logits_to_keep=n_ctx - first)
    return out.logits[0, :-1, :].float().cpu().numpy()


def peak_vram_mb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_reserved() / 2**20, 1)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return "cpu"
