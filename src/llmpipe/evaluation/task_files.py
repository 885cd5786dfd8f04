"""The offline lm-eval tasks shipped in config/eval/tasks/, built deterministically from sources
in the repository: ``python -m llmpipe.evaluation.task_files`` writes them, ``--check`` fails
when the shipped files differ from what the sources give (a unit test runs it).

- ``reverse_words.jsonl``: the fine-tune task's held-out split as the default config makes it
  (``finetune.task_heldout_examples`` 100, ``data_seed`` 0): the tuned model never saw these
  instructions. Generation, exact match.
- ``gpl_cloze.jsonl``: multiple choice, the last word of a sentence of the GNU GPL v3 text
  (config/eval/gpl-3.0.txt, the evaluation text already shipped; (c) FSF, "Everyone is permitted
  to copy and distribute verbatim copies of this license document"): the sentence is quoted
  verbatim up to its last word, the three wrong choices are last words of other sentences.
"""

from __future__ import annotations

import json
import random
import re
import sys

from llmpipe.finetune import tasks as ft_tasks
from llmpipe.paths import REPO_ROOT

TASK_DIR = REPO_ROOT / "config" / "eval" / "tasks"
GPL_TEXT = REPO_ROOT / "config" / "eval" / "gpl-3.0.txt"
# The defaults of finetune.task_train_examples / task_heldout_examples / data_seed (schema)
REVERSE_WORDS = {"n_train": 1000, "n_heldout": 100, "seed": 0}
CLOZE_DOCS = 100
CLOZE_CHOICES = 4
CLOZE_SEED = "gpl_cloze-0"


def reverse_words_docs() -> list[dict]:
    _, heldout = ft_tasks.generate("reverse_words", **REVERSE_WORDS)
    return [{"instruction": r["instruction"], "response": r["response"]} for r in heldout]


def sentences(text: str) -> list[str]:
    """Sentences of plain prose: whitespace collapsed, split after . ! ? before a capital."""
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)]


def gpl_cloze_docs(text: str) -> list[dict]:
    """Sentences of 8-40 words ending in a word of letters only (4+): context, choices, label."""
    items = []
    for sentence in sentences(text):
        words = sentence.rstrip(".!?").split(" ")
        last = words[-1]
        if 8 <= len(words) <= 40 and re.fullmatch(r"[a-z]{4,}", last):
            items.append((" ".join(words[:-1]), last))
    answers = sorted({last for _, last in items})
    rng = random.Random(CLOZE_SEED)  # noqa: S311 - a reproducible task, not a secret
    docs = []
    for context, last in items[:CLOZE_DOCS]:
        wrong = rng.sample([a for a in answers if a != last], CLOZE_CHOICES - 1)
        choices = [last, *wrong]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(last)})
    return docs


def built() -> dict[str, str]:
    """{file name: content} of every generated file."""

    def jsonl(docs):
        return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)

    return {
        "reverse_words.jsonl": jsonl(reverse_words_docs()),
        "gpl_cloze.jsonl": jsonl(gpl_cloze_docs(GPL_TEXT.read_text(encoding="utf-8"))),
    }


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for name, content in built().items():
        path = TASK_DIR / name
        if path.is_file() and path.read_text(encoding="utf-8") == content:
            continue
        if check:
            stale.append(str(path))
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            f"out of date: {', '.join(stale)} (run python -m llmpipe.evaluation.task_files)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
