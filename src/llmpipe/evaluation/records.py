"""Plain records shared by both backends: the sampling settings, one prompt's result, and the
rule that picks the decode thread count from timed steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Sampling:
    """Generation settings (config ``evaluate.sampling``). ``temperature`` 0 = greedy."""

    max_new_tokens: int = 100
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 1234

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @classmethod
    def from_config(cls, section: dict) -> Sampling:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in section.items() if k in known})

    def prompt_seed(self, index: int) -> int:
        """Each prompt has its own seed (seed + its line index), so a prompt samples the same
        tokens whichever shard and batch it lands in (llama.cpp backend)."""
        return (self.seed + index) % (2**32)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptResult:
    """One prompt's generation. ``token_ids`` are the sampled tokens, including a final
    end-of-generation token when the model produced one; ``text`` omits that token."""

    index: int
    prompt: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop: str = "length"  # "eos", "length" or "context"

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps (the first comes from the prompt pass)."""
        return max(self.generated_tokens - 1, 0)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["generated_tokens"] = self.generated_tokens
        return out


# One thread must beat the configured count by this much to replace it: a few timed steps on a
# shared machine are noisy, and the configured count is what the job was given.
ONE_THREAD_MARGIN = 0.10


def choose_threads(step_s: dict[int, float], configured: int) -> int:
    """The thread count to decode with, from the best step time of each candidate."""
    if 1 in step_s and step_s[1] < step_s[configured] * (1 - ONE_THREAD_MARGIN):
        return 1
    return configured
