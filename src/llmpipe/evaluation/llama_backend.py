"""The llama.cpp backend (llama-cpp-python, pinned): load a GGUF, generate, score chunks, bench.

``LlamaCppBackend`` is the evaluation's interface to it (``backend.Backend``); the functions
below are its parts, used on their own by the sweep and the importance matrix.

The model and context are made by ``llama_cpp.Llama`` (every setting from config); the loops
use the C API directly (``llama_decode`` on a reused batch, llama.cpp's own sampler chain), so
a generated token costs its share of one ``llama_decode`` plus a native sampling call, nothing
more, and the prompt passes and the decode steps are timed separately. Plain greedy decoding
reads the argmax straight off the logits (the sampler chain copies the whole vocabulary into a
fresh 12-byte-per-token array for every token, which costs cache traffic the argmax does not).

Generation decodes up to ``parallel`` prompts together, as llama-server and
llama-batched-bench do: one KV cache of ``parallel`` sequences (``n_seq_max``), each with its
own stream of ``n_ctx`` cells (``kv_unified`` off: the context holds ``parallel x n_ctx``
cells, so ``n_ctx`` keeps meaning one prompt's context), one ``llama_decode`` per step for
every live sequence, and a finished sequence's slot refilled by the next prompt (its cells
cleared with ``llama_memory_seq_rm``, its prompt prefilled in a pass of its own). Each prompt
has its own sampler chain and seed, so it samples the same tokens whichever slot it lands in.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmpipe import config as cfg
from llmpipe.errors import ConfigError, PipelineError
from llmpipe.evaluation.records import PromptResult, Sampling, choose_threads


@dataclass(frozen=True)
class LlamaSettings:
    """A typed view of config ``evaluate.llama_cpp``, validated by the schema (its defaults fill
    what a caller leaves out); threads resolved to the job's count when null."""

    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    split_mode: str
    tensor_split: tuple[float, ...] | None
    main_gpu: int
    flash_attn: bool
    kv_type: str
    use_mmap: bool
    offload_kqv: bool
    tune_threads: bool
    parallel: int
    repack: bool

    @classmethod
    def from_config(cls, section: dict, threads: int) -> LlamaSettings:
        values = {**cfg.defaults("evaluate.llama_cpp"), **section}
        values = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        values["n_threads"] = values.get("n_threads") or threads
        values["n_threads_batch"] = values.get("n_threads_batch") or values["n_threads"]
        if values.get("tensor_split") is not None:
            values["tensor_split"] = tuple(float(x) for x in values["tensor_split"])
        return cls(**values)

    @property
    def uses_gpu(self) -> bool:
        return self.n_gpu_layers != 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tensor_split"] = list(self.tensor_split) if self.tensor_split else None
        return out


def ggml_type(name: str) -> int:
    import llama_cpp

    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


def load(
    path: str,
    settings: LlamaSettings,
    *,
    n_ctx: int | None = None,
    n_batch: int | None = None,
    parallel: int = 1,
    verbose: bool = False,
):
    """A ``llama_cpp.Llama`` with every setting from ``settings`` (``n_ctx``/``n_batch`` may be
    overridden, e.g. for perplexity, where a whole chunk is one batch), its context holding
    ``parallel`` sequences of ``n_ctx`` cells each."""
    import llama_cpp

    n_ctx = n_ctx or settings.n_ctx
    n_batch = min(n_batch or settings.n_batch, n_ctx)
    split = {
        "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
        "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
        "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
    }[settings.split_mode]
    if settings.uses_gpu and not llama_cpp.llama_supports_gpu_offload():
        print(
            "warning: evaluate.llama_cpp.n_gpu_layers is set but this llama-cpp-python build has "
            "no GPU support (rebuild with LLMPIPE_CUDA=1 tools/setup.sh); running on the CPU",
            flush=True,
        )
    try:
        with _model_defaults(use_extra_bufts=settings.repack):
            llm = llama_cpp.Llama(
                str(path),
                n_gpu_layers=settings.n_gpu_layers,
                split_mode=split,
                main_gpu=settings.main_gpu,
                tensor_split=list(settings.tensor_split) if settings.tensor_split else None,
                use_mmap=settings.use_mmap,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=min(settings.n_ubatch, n_batch),
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads_batch,
                flash_attn=settings.flash_attn,
                offload_kqv=settings.offload_kqv,
                type_k=ggml_type(settings.kv_type),
                type_v=ggml_type(settings.kv_type),
                logits_all=False,
                verbose=verbose,
            )
        if parallel > 1:
            _make_sequences(llm, parallel, n_ctx, verbose)
        return llm
    except (ValueError, RuntimeError) as err:
        raise PipelineError(f"llama.cpp could not load {path}: {err}") from err


@contextlib.contextmanager
def _model_defaults(**fields):
    """``Llama()`` builds its model parameters from ``llama_model_default_params()`` and has
    no argument for some of them (``use_extra_bufts``: weight repacking): the defaults carry
    ``fields`` while it loads."""
    from llama_cpp import llama_cpp as lib

    original = lib.llama_model_default_params

    def amended():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lib.llama_model_default_params = amended
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def _make_sequences(llm, parallel: int, n_ctx: int, verbose: bool) -> None:
    """Replace ``llm``'s one-sequence context with one of ``parallel`` sequences.

    ``Llama()`` has no ``n_seq_max`` argument, so its context (its settings kept) is freed and
    made again. ``kv_unified`` off: llama.cpp splits ``n_ctx`` evenly over the sequences, each
    attending only to its own stream of cells; ``n_ctx x parallel`` cells give each the
    configured ``n_ctx`` (llama.cpp's advice for sequences that share no prefix)."""
    from llama_cpp import _internals

    params = llm.context_params
    params.n_ctx = n_ctx * parallel
    params.n_seq_max = parallel
    params.kv_unified = False
    llm._ctx.close()  # freed first: the two never hold memory at once
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=verbose)


class _Batch:
    """One reusable ``llama_batch``: a sequence's tokens, or one token of each of several."""

    def __init__(self, capacity: int) -> None:
        import llama_cpp

        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)

    def fill(self, tokens, start_pos: int, logits_from: int | None, seq_id: int = 0) -> None:
        """``tokens`` of sequence ``seq_id`` at positions ``start_pos``...; logits for batch
        index >= ``logits_from`` (None: only the last token)."""
        b = self.batch
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"batch of {n} tokens exceeds capacity {self.capacity}")
        b.n_tokens = n
        last = n - 1 if logits_from is None else logits_from
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = i >= last

    def fill_step(self, rows) -> None:
        """One decode step: a ``(token, position, sequence id)`` per row, logits for each."""
        b = self.batch
        if len(rows) > self.capacity:
            raise ValueError(f"step of {len(rows)} sequences exceeds capacity {self.capacity}")
        b.n_tokens = len(rows)
        token, pos, n_seq_id, seq_id, logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        for i, (tok, p, seq) in enumerate(rows):
            token[i], pos[i], n_seq_id[i], seq_id[i][0], logits[i] = tok, p, 1, seq, True

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


def _decode(llm, batch: _Batch) -> None:
    import llama_cpp

    _check_decode(llama_cpp.llama_decode(llm.ctx, batch.batch))


def _check_decode(rc: int) -> None:
    if rc != 0:
        raise PipelineError(f"llama_decode failed (rc={rc}; context full or out of memory)")


def _clear(llm) -> None:
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def vocab(llm):
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


def bos_for_chunks(llm) -> int | None:
    """The BOS id when the model adds one (llama-perplexity then puts it first in every chunk)."""
    import llama_cpp

    v = vocab(llm)
    return int(llama_cpp.llama_vocab_bos(v)) if llama_cpp.llama_vocab_get_add_bos(v) else None


def tokenize(llm, text: str) -> list[int]:
    """As llama.cpp tokenizes a prompt or the evaluation text: BOS when the model adds one."""
    import llama_cpp

    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab(llm)))
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))


def warm_up(llm) -> None:
    """One tiny decode so the weights are resident (mmap pages, GPU buffers) before timing."""
    import llama_cpp

    batch = _Batch(1)
    try:
        batch.fill([int(llama_cpp.llama_vocab_bos(vocab(llm)))], 0, None)
        _decode(llm, batch)
        llama_cpp.llama_synchronize(llm.ctx)
    finally:
        batch.close()
        _clear(llm)


def tune_threads(llm, settings: LlamaSettings, steps: int = 8) -> dict:
    """On the CPU, time ``steps`` decode steps with ``n_threads`` threads and with one, and keep
    one for generation and prompts only if it is clearly faster (``choose_threads``).
    llama.cpp's threads spin at every barrier: when another process holds a core, two threads
    can be many times slower than one."""
    import llama_cpp

    if settings.uses_gpu or settings.n_threads <= 1:
        return {"threads_used": settings.n_threads, "step_s": {}}
    step_s = {}
    batch = _Batch(1)
    try:
        for candidate in (settings.n_threads, 1):
            llama_cpp.llama_set_n_threads(llm.ctx, candidate, candidate)
            _clear(llm)
            best = float("inf")
            for pos in range(steps):
                batch.fill([int(llama_cpp.llama_vocab_bos(vocab(llm)))], pos, None)
                start = time.perf_counter()
                _decode(llm, batch)
                llama_cpp.llama_synchronize(llm.ctx)
                best = min(best, time.perf_counter() - start)
            step_s[candidate] = round(best, 5)
    finally:
        batch.close()
        _clear(llm)
    chosen = choose_threads(step_s, settings.n_threads)
    threads_batch = settings.n_threads_batch if chosen == settings.n_threads else 1
    llama_cpp.llama_set_n_threads(llm.ctx, chosen, threads_batch)
    return {"threads_used": chosen, "step_s": step_s}


def _sampler(llm, sampling: Sampling, seed: int, n_ctx: int):
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if sampling.repetition_penalty != 1.0:
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                llm.n_vocab(), n_ctx, sampling.repetition_penalty, 0.0, 0.0
            ),
        )
    if sampling.greedy:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if sampling.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


@dataclass
class _Sequence:
    """One prompt in a slot of the context: sequence id ``seq``, its tokens so far."""

    seq: int
    index: int
    prompt: str
    tokens: list[int]
    chain: object
    ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0  # the decode steps it took part in (and its first token's sampling)
    stop: str | None = None

    @property
    def n_past(self) -> int:
        """Positions in its KV cells: the prompt and every sampled token but the newest."""
        return len(self.tokens) + len(self.ids) - 1

    def result(self, llm) -> PromptResult:
        text_ids = self.ids[:-1] if self.stop == "eos" else self.ids
        return PromptResult(
            index=self.index,
            prompt=self.prompt,
            prompt_tokens=len(self.tokens),
            token_ids=self.ids,
            text=llm.detokenize(text_ids).decode("utf-8", errors="replace"),
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            stop=self.stop or "length",
        )


@dataclass
class Decoded:
    """``generate``'s results (prompt order) and the time and count of its decode steps (every
    live sequence in one ``llama_decode``); a prompt's own ``decode_s`` counts the steps it
    took part in, so it exceeds its share when several sequences share a step."""

    results: list[PromptResult]
    decode_steps: int
    decode_s: float
    parallel: int


def generate(
    llm, prompts: list[tuple[int, str]], sampling: Sampling, argmax_greedy: bool = True
) -> list[PromptResult]:
    """Every prompt, up to the context's ``n_seq_max`` at a time (``decode``); the results."""
    return decode(llm, prompts, sampling, argmax_greedy).results


def decode(
    llm,
    prompts: list[tuple[int, str]],
    sampling: Sampling,
    argmax_greedy: bool = True,
    stop_at_eog: bool = True,
) -> Decoded:
    """The prompts through the context's ``n_seq_max`` slots, in order: a free slot takes the
    next prompt (its cells cleared, one timed prompt pass from position 0, its first token
    sampled), then one timed ``llama_decode`` advances every live sequence by a token.
    ``argmax_greedy``: greedy without a repetition penalty takes the logits' argmax (the token
    llama.cpp's greedy sampler picks: the first largest) instead of the sampler chain.
    ``stop_at_eog`` False: every prompt runs to ``max_new_tokens`` (a benchmark's fixed-length
    decode, as llama-batched-bench's).

    A sequence computes what it would alone: its own cells (no unified cache), its own prompt
    pass, positions from 0; only the decode step's matrix products see several rows, with the
    same kernels as one row's unless the weights are repacked (``repack``)."""
    import llama_cpp

    ctx = llm.ctx
    parallel = int(llama_cpp.llama_n_seq_max(ctx))
    n_ctx = int(llama_cpp.llama_n_ctx_seq(ctx))
    memory = llama_cpp.llama_get_memory(ctx)
    plain_greedy = argmax_greedy and sampling.greedy and sampling.repetition_penalty == 1.0
    argmax = _argmax_reader(llm) if plain_greedy else None
    sample = llama_cpp.llama_sampler_sample
    v = vocab(llm)
    is_eog = functools.cache(lambda token: bool(llama_cpp.llama_vocab_is_eog(v, token)))

    def pick(s: _Sequence, i: int) -> None:
        """Sample ``s``'s next token from batch row ``i``'s logits; mark why it stops."""
        tok = argmax(i) if argmax is not None else int(sample(s.chain, ctx, i))
        s.ids.append(tok)
        if stop_at_eog and is_eog(tok):
            s.stop = "eos"
        elif len(s.ids) >= sampling.max_new_tokens:
            s.stop = "length"
        elif s.n_past >= n_ctx:
            s.stop = "context"

    queue = [
        (index, prompt, _prompt_tokens(llm, index, prompt, n_ctx)) for index, prompt in prompts
    ]
    queue.reverse()  # popped from the end: prompt order
    free = list(range(parallel - 1, -1, -1))
    live: list[_Sequence] = []
    done: list[_Sequence] = []
    prefill = _Batch(max(llm.n_batch, 1))
    step = _Batch(parallel)
    steps, decode_s = 0, 0.0
    try:
        while True:
            while queue and free:
                index, prompt, tokens = queue.pop()
                seq = _Sequence(free.pop(), index, prompt, tokens, None)
                seq.chain = _sampler(llm, sampling, sampling.prompt_seed(index), n_ctx)
                llama_cpp.llama_memory_seq_rm(memory, seq.seq, -1, -1)
                seq.prefill_s = _prefill(llm, prefill, seq)
                start = time.perf_counter()
                pick(seq, -1)
                seq.decode_s = time.perf_counter() - start
                decode_s += seq.decode_s
                (done if seq.stop else live).append(seq)
                if seq.stop:
                    free.append(seq.seq)
            if not live:
                break
            start = time.perf_counter()
            step.fill_step([(s.ids[-1], s.n_past, s.seq) for s in live])
            _check_decode(llama_cpp.llama_decode(ctx, step.batch))
            for i, s in enumerate(live):
                pick(s, i)
            spent = time.perf_counter() - start
            steps += 1
            decode_s += spent
            going = []
            for s in live:
                s.decode_s += spent
                if s.stop:
                    done.append(s)
                    free.append(s.seq)
                else:
                    going.append(s)
            live = going
    finally:
        for s in live + done:
            if s.chain is not None:
                llama_cpp.llama_sampler_free(s.chain)
        prefill.close()
        step.close()
        llama_cpp.llama_memory_clear(memory, True)
    results = sorted((s.result(llm) for s in done), key=lambda r: r.index)
    return Decoded(results, steps, decode_s, parallel)


def _prompt_tokens(llm, index: int, prompt: str, n_ctx: int) -> list[int]:
    tokens = tokenize(llm, prompt)
    if not tokens:
        raise PipelineError(f"prompt {index + 1} tokenizes to nothing")
    if len(tokens) >= n_ctx:
        raise ConfigError(
            f"prompt {index + 1} has {len(tokens)} tokens, more than "
            f"evaluate.llama_cpp.n_ctx={n_ctx} allows; raise n_ctx"
        )
    return tokens


def _prefill(llm, batch: _Batch, seq: _Sequence) -> float:
    """``seq``'s prompt in passes of ``n_batch`` tokens (logits for its last token only);
    the seconds it took. The repetition penalty sees the prompt, as transformers' does."""
    import llama_cpp

    for tok in seq.tokens:
        llama_cpp.llama_sampler_accept(seq.chain, tok)
    tokens = seq.tokens
    start = time.perf_counter()
    for pos in range(0, len(tokens), batch.capacity):
        part = tokens[pos : pos + batch.capacity]
        last_part = pos + batch.capacity >= len(tokens)
        batch.fill(part, pos, None if last_part else len(part), seq_id=seq.seq)
        _decode(llm, batch)
    llama_cpp.llama_synchronize(llm.ctx)
    return time.perf_counter() - start


def _argmax_reader(llm):
    """A function returning the argmax of batch row ``i``'s logits (-1: the last), read in
    place.

    ``llama_get_logits_ith`` synchronizes and returns the row's address. The rows live in the
    context's output buffer, which stays put from one decode to the next, so the numpy view
    of an address is made once, not every token (a decode step streams the weights through
    the caches and leaves Python's own objects cold, so making it each time is costly)."""
    import ctypes

    import llama_cpp

    # The same C function, declared to return the address as a plain int.
    row_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
        ctypes.cast(llama_cpp.llama_get_logits_ith, ctypes.c_void_p).value
    )
    ctx, n_vocab = llm.ctx, llm.n_vocab()
    rows: dict[int, np.ndarray] = {}

    def argmax(i: int = -1) -> int:
        address = row_address(ctx, i)
        row = rows.get(address)
        if row is None:
            if not address:
                raise PipelineError(f"llama.cpp returned no logits for batch row {i}")
            row = rows[address] = np.ctypeslib.as_array(
                (ctypes.c_float * n_vocab).from_address(address)
            )
        return int(row.argmax())

    return argmax


def chunk_logits(llm, chunk_input: np.ndarray, first: int) -> np.ndarray:
    """Logits at positions ``first`` .. ``n_ctx - 2`` of one chunk (one pass, empty cache)."""
    import llama_cpp

    n_ctx = len(chunk_input)
    if llm.n_batch < n_ctx or llm.n_ctx() < n_ctx:
        raise ValueError(f"context (n_ctx {llm.n_ctx()}, n_batch {llm.n_batch}) < chunk {n_ctx}")
    batch = _Batch(n_ctx)
    try:
        _clear(llm)
        batch.fill(chunk_input, 0, first)
        batch.batch.logits[n_ctx - 1] = False  # predicts past the chunk: never scored
        _decode(llm, batch)
        n_out = n_ctx - 1 - first
        ptr = llama_cpp.llama_get_logits(llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, llm.n_vocab())).copy()
    finally:
        batch.close()


def bench(llm, n_prompt: int, n_gen: int, repetitions: int, seed: int = 0) -> dict:
    """llama-bench's two tests: ``pp`` (a prompt of n_prompt random tokens, one batch) and
    ``tg`` (n_gen single-token decodes from an empty cache), each after a warm-up run."""
    import llama_cpp

    rng = np.random.default_rng(seed)
    n_vocab = llm.n_vocab()
    batch = _Batch(max(n_prompt, 1))
    out: dict[str, list[float]] = {"pp": [], "tg": []}
    try:
        for rep in range(repetitions + 1):
            if n_prompt:
                _clear(llm)
                tokens = rng.integers(0, n_vocab, n_prompt)
                start = time.perf_counter()
                for pos in range(0, n_prompt, llm.n_batch):
                    part = tokens[pos : pos + llm.n_batch]
                    batch.fill(part, pos, None)
                    _decode(llm, batch)
                llama_cpp.llama_synchronize(llm.ctx)
                if rep:
                    out["pp"].append(n_prompt / (time.perf_counter() - start))
            if n_gen:
                _clear(llm)
                tok = int(rng.integers(0, n_vocab))
                start = time.perf_counter()
                for pos in range(n_gen):
                    batch.fill([tok], pos, None)
                    _decode(llm, batch)
                llama_cpp.llama_synchronize(llm.ctx)
                if rep:
                    out["tg"].append(n_gen / (time.perf_counter() - start))
    finally:
        batch.close()
        _clear(llm)

    def stats(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    pp, pp_sd = stats(out["pp"])
    tg, tg_sd = stats(out["tg"])
    return {"pp_tok_s": pp, "pp_sd": pp_sd, "tg_tok_s": tg, "tg_sd": tg_sd}


def n_layers(llm) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_layer(llm.model))


def kv_type_bytes(settings: LlamaSettings) -> float:
    from llmpipe.evaluation.figures import KV_TYPE_BYTES

    return KV_TYPE_BYTES[settings.kv_type]


def offloads_to_gpu(settings: LlamaSettings) -> bool:
    """Layers go to a GPU: asked for, and this build and host have one."""
    import llama_cpp

    from llmpipe import provenance

    return (
        settings.uses_gpu
        and bool(llama_cpp.llama_supports_gpu_offload())
        and bool(provenance.gpus())
    )


# --------------------------------------------------------------------------------------------
# The evaluation's interface (backend.Backend, backend.Model)
# --------------------------------------------------------------------------------------------


class LlamaCppModel:
    """A loaded GGUF (``backend.Model``)."""

    def __init__(self, path, settings: LlamaSettings, n_ctx: int | None) -> None:
        from llmpipe import provenance
        from llmpipe.evaluation.figures import gguf_weight_bytes

        self.path = Path(path)
        self.cfg = settings
        # Read before the model is loaded: the reader maps the whole file, and with the model's
        # own mapping of it the job's peak memory would count the file twice.
        self._weight_bytes = gguf_weight_bytes(self.path)
        # perplexity (n_ctx given): one sequence, the whole chunk one batch
        parallel = 1 if n_ctx else settings.parallel
        self.llm = load(str(path), settings, n_ctx=n_ctx, n_batch=n_ctx, parallel=parallel)
        self.on_gpu = offloads_to_gpu(settings)
        self.device = provenance.gpus()[0]["name"] if self.on_gpu else "cpu"
        self.n_vocab = self.llm.n_vocab()
        self.bos_for_chunks = bos_for_chunks(self.llm)
        self.kv_elem_bytes = kv_type_bytes(settings)

    def settings(self) -> dict:
        return self.cfg.as_dict()

    def warm_up(self) -> None:
        warm_up(self.llm)

    def tune_threads(self, rows: int) -> dict:
        if not self.cfg.tune_threads:
            return {"threads_used": self.cfg.n_threads, "step_s": {}}
        return tune_threads(self.llm, self.cfg)

    def generate(self, prompts, sampling: Sampling):
        from llmpipe.evaluation.backend import Generation

        run = decode(self.llm, prompts, sampling)
        return Generation(
            run.results,
            decode_steps=run.decode_steps,
            decode_s=run.decode_s,
            sequences=run.parallel,
        )

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.llm, text)

    def chunk_logits(self, chunk_input: np.ndarray, first: int) -> np.ndarray:
        return chunk_logits(self.llm, chunk_input, first)

    def weight_bytes(self):
        return self._weight_bytes

    def gb_disk_to_device(self) -> float:
        """The file's bytes; with partial offload, the offloaded layers' share (of the layers
        and the output layer: n_gpu_layers of n_layers + 1)."""
        from llmpipe.evaluation.figures import GB

        share = 1.0
        if self.on_gpu and self.cfg.n_gpu_layers >= 0:
            layers = n_layers(self.llm)
            share = min(self.cfg.n_gpu_layers, layers + 1) / (layers + 1)
        return self.path.stat().st_size * share / GB

    def peak_vram_mb(self) -> float | None:
        return None  # the job's Usage reads the process's GPU memory from the driver

    def close(self) -> None:
        self.llm.close()


class LlamaCppBackend:
    """llama.cpp on a GGUF variant (``backend.Backend``)."""

    def stage_name(self, model_id: str, variant: str) -> str:
        return f"{model_id}-{variant}"

    def load(self, path, settings: dict, threads: int, *, gpus: int = 1, n_ctx=None):
        # gpus: llama.cpp spreads layers over the visible GPUs by its own split settings
        return LlamaCppModel(path, LlamaSettings.from_config(settings, threads), n_ctx)
