"""The seeded default task as a command: ``python -m llmpipe.finetune.data OUT_DIR``.

Writes ``train.jsonl`` and ``heldout.jsonl`` of the built-in task (what the workflow's
finetune_data rule writes for a model without its own data files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmpipe.finetune import dataset
from llmpipe.finetune.settings import DATA, Settings


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m llmpipe.finetune.data", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", default=defaults.task)
    parser.add_argument("--train", type=int, default=defaults.task_train_examples)
    parser.add_argument("--heldout", type=int, default=defaults.task_heldout_examples)
    parser.add_argument("--seed", type=int, default=defaults.data_seed)
    args = parser.parse_args(argv)
    settings = {
        **defaults.group(DATA),
        "task": args.task,
        "task_train_examples": args.train,
        "task_heldout_examples": args.heldout,
        "data_seed": args.seed,
    }
    summary = dataset.prepare(
        settings, args.out_dir / "train.jsonl", args.out_dir / "heldout.jsonl"
    )
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
