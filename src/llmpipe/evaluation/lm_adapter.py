"""An lm-eval model that scores a GGUF as llama.cpp runs it: requests to our own ``llama-server``
(``server.LlamaServer``) through its native ``/completion`` endpoint.

Why not lm-eval's ``local-completions`` or ``gguf`` models: both score a multiple-choice answer
with the OpenAI endpoint's ``echo`` + ``logprobs`` (log-probs of the prompt's own tokens, read
from OpenAI's ``token_logprobs``). Measured on the pinned llama-server: ``/v1/completions``
accepts ``echo: true`` but returns the log-probs of the generated tokens only, as
``logprobs.content`` (no ``token_logprobs``, nothing for the prompt). Its native
endpoint does report, with ``n_probs``, the log-probability of each generated token computed from
the raw logits (before any sampler), so a continuation token is scored exactly by forcing it with
a ``logit_bias``: one request of one token per continuation token, on the context plus the
continuation so far (the server's prompt cache keeps the shared prefix). Requests run in as many
threads as the server has slots. ``loglikelihood_rolling`` (perplexity tasks) is not offered:
``evaluate_quality`` measures a GGUF's perplexity already (``tasks.REFUSED``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lm_eval.api.model import LM

from llmpipe.errors import PipelineError
from llmpipe.evaluation.server import request

# A bias no logit overcomes: the forced token is always the one "sampled". The log-prob the
# server reports is computed before the samplers, so the bias does not change it.
FORCE_BIAS = 1e9
DEFAULT_MAX_GEN_TOKS = 256


class LlamaServerLM(LM):
    """lm-eval's ``LM`` over a running llama-server at ``url`` with ``slots`` parallel slots."""

    def __init__(self, url: str, slots: int, name: str):
        super().__init__()
        self.url = url
        self.slots = slots
        self.name = name
        self._template: str | None = None

    # ---- the server's tokenizer and chat template -----------------------------------------
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        body = {"content": text, "add_special": add_special, "parse_special": True}
        return request(f"{self.url}/tokenize", body)["tokens"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as lm-eval's own models split them: the pair
        tokenized together, trailing spaces of the context moved to the continuation."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenize(context + continuation, add_special=True)
        ctx = self.tokenize(context, add_special=True)
        if not ctx:
            raise PipelineError(
                "llama-server adapter: a request with an empty context (a task that scores "
                "text from its start) is not supported for GGUF variants"
            )
        return ctx, whole[len(ctx) :]

    @property
    def tokenizer_name(self) -> str:
        return f"llama-server:{self.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if self._template is None:
            self._template = request(f"{self.url}/props").get("chat_template", "")
        return self._template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt=True):
        """The GGUF's own chat template, rendered by the server (as llama.cpp prompts it)."""
        body = {"messages": chat_history, "add_generation_prompt": add_generation_prompt}
        return request(f"{self.url}/apply-template", body)["prompt"]

    # ---- scoring --------------------------------------------------------------------------
    def _forced(self, prompt: list[int], token: int) -> tuple[float, bool]:
        """log p(token | prompt) and whether it is the most likely next token."""
        answer = request(
            f"{self.url}/completion",
            {
                "prompt": prompt,
                "n_predict": 1,
                "n_probs": 1,
                "temperature": 0,
                "logit_bias": [[token, FORCE_BIAS]],
                "cache_prompt": True,
            },
        )
        (probs,) = answer["completion_probabilities"]
        if probs["id"] != token:
            raise PipelineError(
                f"llama-server returned token {probs['id']} where {token} was forced: "
                "its log-prob schema changed (see llmpipe.evaluation.lm_adapter)"
            )
        top = probs["top_logprobs"][0]["id"]
        return float(probs["logprob"]), top == token

    def _loglikelihood_one(self, args: tuple[str, str]) -> tuple[float, bool]:
        ctx, cont = self.encode_pair(*args)
        total, greedy = 0.0, True
        for i, token in enumerate(cont):
            logprob, is_top = self._forced(ctx + cont[:i], token)
            total += logprob
            greedy = greedy and is_top
        return total, greedy

    def _generate_one(self, args: tuple[str, dict[str, Any]]) -> str:
        context, kwargs = args
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
            raise PipelineError(
                "llama-server adapter: sampled generation is not supported (greedy only, "
                "so that results repeat); remove do_sample/temperature from the task"
            )
        answer = request(
            f"{self.url}/completion",
            {
                "prompt": self.tokenize(context, add_special=True),
                "n_predict": int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
                "temperature": 0,
                "stop": until,
                "cache_prompt": True,
            },
        )
        text = answer["content"]
        for stop in until:  # the server stops at a stop string; cut the same way lm-eval does
            text = text.split(stop)[0]
        return text

    def _map(self, fn, requests, kind: str) -> list:
        with ThreadPoolExecutor(max_workers=self.slots) as pool:
            results = list(pool.map(fn, [req.args for req in requests]))
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial(kind, req.args, result)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._map(self._loglikelihood_one, requests, "loglikelihood")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._map(self._generate_one, requests, "generate_until")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise PipelineError(
            "llama-server adapter: loglikelihood_rolling (perplexity tasks) is not offered for "
            "GGUF variants; evaluate_quality measures their perplexity"
        )
