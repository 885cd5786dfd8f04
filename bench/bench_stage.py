"""cache_to_shm vs `cp -r` of the same model folder to the same RAM disk, measured in one run.

    .venv/bin/python bench/bench_stage.py [MODEL_DIR] [--root /dev/shm] [--repeats 5]

MODEL_DIR defaults to results/models/smollm2/hf (run the workflow first). Each repeat copies to
a fresh destination (page cache warm for the source in both cases: the first, cold read is
discarded). Prints GB/s of both and the ratio ours / cp (goal: >= 1.0 minus noise), and the cost
of the sha256 verification mode separately.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from llmpipe import manifest
from llmpipe.stage import ensure_staged


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default="results/models/smollm2/hf")
    parser.add_argument("--root", default="/dev/shm")  # noqa: S108 (the RAM disk itself)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    src = Path(args.model_dir).resolve()
    mf = manifest.build(src, hash_files=True)
    nbytes = mf["total_bytes"]
    base = Path(tempfile.mkdtemp(prefix="bench-stage-", dir=args.root))
    try:
        subprocess.run(["cp", "-rL", str(src), str(base / "warm")], check=True)  # warm source
        shutil.rmtree(base / "warm")
        rates: dict[str, list[float]] = {"cp -rL": [], "ours (size)": [], "ours (sha256)": []}
        for i in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(["cp", "-rL", str(src), str(base / f"cp{i}")], check=True)
            rates["cp -rL"].append(nbytes / 1e9 / (time.perf_counter() - start))
            shutil.rmtree(base / f"cp{i}")
            for mode, label in (("size", "ours (size)"), ("sha256", "ours (sha256)")):
                root = base / f"{mode}{i}"
                start = time.perf_counter()
                record = ensure_staged(src, mf, root, "bench", verify=mode)
                rates[label].append(nbytes / 1e9 / (time.perf_counter() - start))
                assert not record["hit"]
                shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    cp = statistics.median(rates["cp -rL"])
    print(
        f"model folder: {src} ({nbytes / 1e9:.3f} GB), root {args.root}, "
        f"{args.repeats} repeats, median GB/s"
    )
    print(f"{'method':<16}{'GB/s':>8}{'ratio vs cp':>14}")
    for label, values in rates.items():
        med = statistics.median(values)
        print(f"{label:<16}{med:>8.2f}{med / cp:>14.2f}")


if __name__ == "__main__":
    main()
