"""The transformers backend: one model load, every prompt of the job through ``model.generate``.

Prompts are sorted by length and generated ``batch_size`` at a time by transformers' own
``generate`` (left padding, attention masks, the model's own forward and cache), with the
sampling settings from config. On CUDA: fp16 (V100 has no bf16) and
``cache_implementation="static"``, so that transformers may compile the decode step
(``evaluate.transformers.compile``, off by default); a model the estimator does not fit on one
GPU is loaded with ``device_map="auto"`` across the GPUs the job was granted. On the CPU: fp32
and transformers' dynamic cache.

Timing without a decode loop of our own: a ``BaseStreamer`` stamps the moment generate hands
over each new token; the first stamp ends the prompt pass. A batch's decode time (from the first
token to the end) is the aggregate's; a row's own ``decode_s`` is measured up to the stamp of
its last token (the steps it took part in: a row that stopped early is only padding after that),
the per-sequence figure. Per-prompt seeds under sampling: one batched ``generate`` draws every
row from one global generator, so a prompt's sample would depend on its batch.
``PerPromptSampler`` (a logits processor, the last one generate runs before its own draw)
applies transformers' temperature, top-k and top-p warpers and draws each row from that prompt's
own ``torch.Generator`` (``Sampling.prompt_seed``), leaving only the drawn token possible:
generate's own multinomial then returns exactly it. The forward passes and the cache stay
generate's.

``HFBackend`` is the evaluation's interface to it (``backend.Backend``); the functions below
are its parts, which the benchmarks also call on their own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmpipe import config as cfg
from llmpipe.errors import ResourceError
from llmpipe.evaluation.records import PromptResult, Sampling, choose_threads


@dataclass(frozen=True)
class HFSettings:
    """A typed view of config ``evaluate.transformers``, validated by the schema (its defaults
    fill what a caller leaves out); ``threads`` is the job's."""

    device: str
    dtype: str
    batch_size: int
    attn_implementation: str
    tune_threads: bool
    compile: bool
    threads: int

    @classmethod
    def from_config(cls, section: dict, threads: int) -> HFSettings:
        values = {**cfg.defaults("evaluate.transformers"), **section, "threads": threads}
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

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


def placement(device: str, gpus: int) -> dict:
    """``from_pretrained`` keywords that place the model: one GPU (or the CPU), or, when the
    estimator says it needs ``gpus`` > 1, accelerate's ``device_map="auto"`` over that many
    of the visible GPUs (layers split in order; generate moves activations between them)."""
    import torch

    if device != "cuda" or gpus <= 1:
        return {}
    visible = torch.cuda.device_count()
    if visible < gpus:
        raise ResourceError(
            f"evaluate: the model needs {gpus} GPUs (estimator), this job sees {visible}; the "
            f"rule requests them through --gres: check the profile's gpu type and count"
        )
    return {"device_map": "auto", "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in
                                                 range(gpus)}}  # fmt: skip


def load(hf_dir, settings: HFSettings, gpus: int = 1):
    """(model, tokenizer, device, dtype name), the model in eval mode on its device(s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(settings.threads)
    device, dtype = resolve(settings)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.padding_side = "left"
    where = placement(device, gpus)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir,
        dtype=getattr(torch, dtype),
        attn_implementation=settings.attn_implementation,
        **where,
    )
    if not where:
        model.to(device)
    model.eval()
    return model, tokenizer, device, dtype


def input_device(model):
    """Where inputs go: the embedding's device (the first GPU of a split model)."""
    return model.get_input_embeddings().weight.device


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(model, tokenizer, device: str) -> None:
    """One tiny forward pass so kernels and weights are ready before anything is timed."""
    import torch

    ids = tokenizer("Hello", return_tensors="pt").input_ids.to(input_device(model))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    synchronize(device)


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


# --------------------------------------------------------------------------------------------
# generate's hooks: the first-token stamp, and per-prompt draws
# --------------------------------------------------------------------------------------------


class FirstTokenClock:
    """A ``BaseStreamer``: generate calls ``put`` with the prompt, then with each new token,
    then ``end``. ``stamps[k]``: when new token k was on the host (so the device had finished
    its step); ``stamps[0]`` ends the prompt pass."""

    def __init__(self):
        self.puts = 0
        self.stamps: list[float] = []
        self.ended = None

    @property
    def first(self) -> float | None:
        return self.stamps[0] if self.stamps else None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts >= 2:
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.ended = time.perf_counter()


def _streamer():
    from transformers.generation.streamers import BaseStreamer

    class _Clock(FirstTokenClock, BaseStreamer):
        pass

    return _Clock()


def per_prompt_sampler(sampling: Sampling, seeds: list[int]):
    """The logits processor that draws row i from a generator seeded with ``seeds[i]``, after
    transformers' temperature, top-k and top-p (the repetition penalty ran before it, in
    generate's own list); returns scores where only the drawn token is finite.

    With top-k, the k best scores are taken first and everything after works on those k (the
    same tokens survive as with transformers' top-k warper over the whole vocabulary, whose
    other scores become -inf, and the same probabilities): a softmax and draws over k values
    instead of the vocabulary, which on a small model is most of a step's sampling time."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    temperature = TemperatureLogitsWarper(sampling.temperature)
    top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None

    class PerPromptSampler(LogitsProcessor):
        def __init__(self):
            self.generators = None

        def __call__(self, input_ids, scores):
            if self.generators is None:
                self.generators = [
                    torch.Generator(device=scores.device).manual_seed(s) for s in seeds
                ]
            kept, index = scores, None
            if 0 < sampling.top_k < scores.shape[-1]:
                kept, index = scores.topk(sampling.top_k, dim=-1)
            kept = temperature(input_ids, kept)
            if top_p is not None:
                kept = top_p(input_ids, kept)
            probs = torch.softmax(kept.float(), dim=-1)
            picks = torch.stack(
                [torch.multinomial(probs[i], 1, generator=g)[0] for i, g in
                 enumerate(self.generators)]
            )[:, None]  # fmt: skip
            if index is not None:
                picks = index.gather(1, picks)
            return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)

    return PerPromptSampler()


def generation_kwargs(model, tokenizer, sampling: Sampling, device: str, compile: bool) -> dict:
    """generate's settings: the config's sampling (warpers in our sampler when sampling), the
    model's end-of-generation ids, a static cache on CUDA (compiled only with ``compile``)."""
    from transformers import GenerationConfig

    kwargs = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not sampling.greedy,
        "repetition_penalty": sampling.repetition_penalty,
        "eos_token_id": sorted(eos_ids(model, tokenizer)),
        "pad_token_id": pad_id(model, tokenizer),
        "disable_compile": not compile,
    }
    if not sampling.greedy:  # no warpers in generate's own list: ours draws after applying them
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    if device == "cuda":
        kwargs["cache_implementation"] = "static"
    return {"generation_config": GenerationConfig(**kwargs)}


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class BatchRecord:
    """One generation batch: its rows, the decode steps it ran and its padded prompt width."""

    rows: int
    steps: int
    width: int
    prefill_s: float
    decode_s: float


def tune_threads(model, tokenizer, device: str, threads: int, rows: int, rounds: int = 3) -> dict:
    """On the CPU, time a short ``rows``-wide greedy generate with ``threads`` threads and with
    one, alternating ``rounds`` times, and keep one thread only if its decode is clearly faster
    (``choose_threads``). torch's thread pool spins at every barrier; when another process holds
    a core (a shared node, a busy laptop) two threads can be many times slower than one.
    Returns the choice and the best per-step decode times (recorded in the eval JSON)."""
    import torch

    if device != "cpu" or threads <= 1:
        return {"threads_used": threads, "step_s": {}}
    prompts = [(i, "The quick brown fox jumps over the lazy dog") for i in range(max(rows, 1))]
    greedy = Sampling(max_new_tokens=4, temperature=0.0)
    step_s = {threads: float("inf"), 1: float("inf")}
    for _ in range(rounds):
        for candidate in (threads, 1):
            torch.set_num_threads(candidate)
            _, (batch,) = generate(model, tokenizer, device, prompts, greedy, len(prompts))
            if batch.steps:
                step_s[candidate] = min(step_s[candidate], batch.decode_s / batch.steps)
    step_s = {k: round(v, 5) for k, v in step_s.items()}
    chosen = choose_threads(step_s, threads)
    torch.set_num_threads(chosen)
    return {"threads_used": chosen, "step_s": step_s}


def generate(
    model,
    tokenizer,
    device: str,
    prompts: list[tuple[int, str]],
    sampling: Sampling,
    batch_size: int,
    compile: bool = False,
) -> tuple[list[PromptResult], list[BatchRecord]]:
    """All prompts, ``batch_size`` at a time (sorted by length, so padding stays small), each
    batch one ``model.generate``."""
    tokenized = [(index, prompt, tokenize(tokenizer, prompt)) for index, prompt in prompts]
    tokenized.sort(key=lambda item: len(item[2]))
    kwargs = generation_kwargs(model, tokenizer, sampling, device, compile)
    results: list[PromptResult] = []
    batches: list[BatchRecord] = []
    for start in range(0, len(tokenized), max(batch_size, 1)):
        part = tokenized[start : start + batch_size]
        done, record = _generate_batch(model, tokenizer, device, part, sampling, kwargs)
        results.extend(done)
        batches.append(record)
    results.sort(key=lambda r: r.index)
    return results, batches


def _generate_batch(model, tokenizer, device, part, sampling: Sampling, kwargs: dict):
    import torch

    eos = eos_ids(model, tokenizer)
    pad = kwargs["generation_config"].pad_token_id
    width = max(len(ids) for _, _, ids in part)
    rows = len(part)
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, (_, _, ids) in enumerate(part):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    where = input_device(model)
    clock = _streamer()
    extra = {}
    if not sampling.greedy:
        seeds = [sampling.prompt_seed(index) for index, _, _ in part]
        extra["logits_processor"] = [per_prompt_sampler(sampling, seeds)]
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids.to(where),
            attention_mask=mask.to(where),
            streamer=clock,
            **kwargs,
            **extra,
        )
        synchronize(device)
        finished_at = time.perf_counter()
    new = out[:, width:].tolist()
    prefilled = clock.first or finished_at
    prefill_s, decode_s = prefilled - start, finished_at - prefilled
    generated = []
    for toks in new:
        stop = next((k for k, t in enumerate(toks) if t in eos), None)
        generated.append(toks if stop is None else toks[: stop + 1])
    results = []
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
                decode_s=_row_decode_s(clock.stamps, len(toks), finished_at),
                stop=stop,
            )
        )
    steps = max(len(new[0]) - 1, 0) if new else 0
    return results, BatchRecord(rows, steps, width, prefill_s, decode_s)


def _row_decode_s(stamps: list[float], generated: int, finished_at: float) -> float:
    """A row's decode time: from its first token to its last (stamp ``generated - 1``); the
    batch's end when the streamer saw fewer steps."""
    if generated <= 1 or not stamps:
        return 0.0
    last = stamps[generated - 1] if generated - 1 < len(stamps) else finished_at
    return last - stamps[0]


def chunk_logits(model, device: str, chunk_input: np.ndarray, first: int) -> np.ndarray:
    """Logits (float32) at positions ``first`` .. ``n_ctx - 2`` of one chunk, one pass."""
    import torch

    n_ctx = len(chunk_input)
    ids = torch.as_tensor(np.asarray(chunk_input, dtype=np.int64))[None].to(input_device(model))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=False, logits_to_keep=n_ctx - first)
    return out.logits[0, :-1, :].float().cpu().numpy()


def peak_vram_mb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(
        sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count())) / 2**20,
        1,
    )


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return "cpu"


# --------------------------------------------------------------------------------------------
# The evaluation's interface (backend.Backend, backend.Model)
# --------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class HFModel:
    """A loaded Hugging Face folder (``backend.Model``)."""

    def __init__(self, path, settings: HFSettings, gpus: int) -> None:
        self.path = Path(path)
        self.cfg = settings
        self.model, self.tokenizer, self.torch_device, self.dtype = load(
            str(path), settings, gpus=gpus
        )
        self.device = device_name(self.torch_device)
        self.n_vocab = int(self.model.config.vocab_size)
        self.bos_for_chunks = bos_for_chunks(self.tokenizer)
        from llmpipe.evaluation.figures import TORCH_DTYPE_BYTES

        self.kv_elem_bytes = TORCH_DTYPE_BYTES[self.dtype]

    def settings(self) -> dict:
        cuda = self.torch_device == "cuda"
        split = getattr(self.model, "hf_device_map", None)
        return {
            **self.cfg.as_dict(),
            "resolved_device": self.torch_device,
            "resolved_dtype": self.dtype,
            "generate": "transformers generate (static cache)" if cuda else "transformers generate",
            "gpus": len(set(split.values())) if split else int(cuda),
        }

    def warm_up(self) -> None:
        warm_up(self.model, self.tokenizer, self.torch_device)

    def tune_threads(self, rows: int) -> dict:
        if not self.cfg.tune_threads:
            return {"threads_used": self.cfg.threads, "step_s": {}}
        rows = min(rows, self.cfg.batch_size)
        return tune_threads(self.model, self.tokenizer, self.torch_device, self.cfg.threads, rows)

    def generate(self, prompts, sampling: Sampling):
        from llmpipe.evaluation.backend import Generation

        results, batches = generate(
            self.model,
            self.tokenizer,
            self.torch_device,
            prompts,
            sampling,
            self.cfg.batch_size,
            compile=self.cfg.compile,
        )
        return Generation(
            results,
            decode_steps=sum(b.steps for b in batches),
            decode_s=sum(b.decode_s for b in batches),
            sequences=max((b.rows for b in batches), default=1),
            extra={"batches": [asdict(b) for b in batches]},
        )

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.tokenizer, text)

    def chunk_logits(self, chunk_input: np.ndarray, first: int) -> np.ndarray:
        return chunk_logits(self.model, self.torch_device, chunk_input, first)

    def weight_bytes(self):
        from llmpipe.evaluation.figures import torch_weight_bytes

        return torch_weight_bytes(self.model)

    def gb_disk_to_device(self) -> float:
        from llmpipe.evaluation.figures import GB

        files = [p for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        return sum(p.stat().st_size for p in files) / GB

    def peak_vram_mb(self) -> float | None:
        return peak_vram_mb(self.torch_device)

    def close(self) -> None:
        """Drop the model; on CUDA give its cached blocks back to the driver."""
        del self.model
        if self.torch_device == "cuda":
            import torch

            torch.cuda.empty_cache()


class HFBackend:
    """transformers on the model's Hugging Face folder (``backend.Backend``)."""

    def stage_name(self, model_id: str, variant: str) -> str:
        return model_id  # the folder cache_to_shm staged, whatever the variant

    def load(self, path, settings: dict, threads: int, *, gpus: int = 1, n_ctx=None):
        # n_ctx: a perplexity chunk is one forward pass of any length
        return HFModel(path, HFSettings.from_config(settings, threads), gpus)
