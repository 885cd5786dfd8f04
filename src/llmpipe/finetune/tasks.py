"""The built-in instruction task of the default run, generated offline from a seed.

``reverse_words``: "Reverse the order of these words: lamp, river, cloud" -> "cloud, river,
lamp", with 3 to 5 words drawn from a fixed list of common nouns. The instruction says exactly
what to do and the answer is checked by exact match, yet the base SmolLM2-135M-Instruct gets
none right (it paraphrases, comments or reorders at random); a few dozen LoRA steps on two CPU
cores teach it. Held-out examples are word sequences that never occur in the training split.
"""

from __future__ import annotations

import random

from llmpipe.errors import ConfigError

# fmt: off
WORDS = (
    "anchor", "apple", "arrow", "basket", "beach", "bottle", "bread", "bridge", "button",
    "cactus", "camera", "candle", "carpet", "castle", "cherry", "circle", "cloud", "coffee",
    "copper", "cotton", "desert", "dolphin", "dragon", "engine", "feather", "finger", "forest",
    "garden", "ginger", "glacier", "guitar", "hammer", "harbor", "helmet", "honey", "island",
    "jacket", "jungle", "kettle", "ladder", "lantern", "lemon", "letter", "magnet", "marble",
    "meadow", "mirror", "monkey", "needle", "nickel", "ocean", "orange", "oyster", "paper",
    "parrot", "pebble", "pencil", "pepper", "pillow", "planet", "pocket", "puzzle", "rabbit",
    "rainbow", "ribbon", "river", "rocket", "saddle", "salt", "scarf", "shadow", "shovel",
    "silver", "spider", "spoon", "stone", "summer", "sunset", "table", "teapot", "ticket",
    "tiger", "tomato", "tunnel", "turtle", "umbrella", "valley", "velvet", "violin", "wagon",
    "wallet", "walnut", "window", "winter", "yogurt", "zebra",
)
# fmt: on

TEMPLATE = "Reverse the order of these words: {words}"


def reverse_words_example(rng: random.Random, min_words: int = 3, max_words: int = 5) -> dict:
    words = rng.sample(WORDS, rng.randint(min_words, max_words))
    return {
        "instruction": TEMPLATE.format(words=", ".join(words)),
        "response": ", ".join(reversed(words)),
    }


def generate(task: str, n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n_train`` training and ``n_heldout`` held-out examples of ``task``; no instruction
    occurs in both splits, and the same seed always gives the same examples."""
    if task != "reverse_words":
        raise ConfigError(f"finetune.task: unknown task {task!r} (expected reverse_words)")
    rng = random.Random(f"{task}-{seed}")  # noqa: S311 - reproducible data, not a secret
    seen: set[str] = set()

    def draw(n: int) -> list[dict]:
        out: list[dict] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise ConfigError(f"finetune.task: cannot draw {n} distinct {task} examples")
            example = reverse_words_example(rng)
            if example["instruction"] in seen:
                continue
            seen.add(example["instruction"])
            out.append({**example, "task": task})
        return out

    heldout = draw(n_heldout)
    train = draw(n_train)
    return train, heldout
