"""Placing one model on N nodes: sbcast (llmpipe.broadcast) vs every node reading shared storage.

    sudo .venv/bin/python bench/bench_broadcast.py [--size-gb 1] [--repeats 3]

Needs root: it starts the local two-node test cluster (tools/slurm; both nodes are slurmds on
this host) and, inside one two-node allocation, measures on the same file:

- **storage read**: one node reading the file from disk with its pages dropped from the page
  cache (posix_fadvise DONTNEED), the per-reader rate of shared storage here;
- **sbcast**: the file to both nodes through Slurm's broadcast (block forwarding through the
  slurmds: a loopback here, the cluster network on a real one);
- **llmpipe.broadcast**: the whole path (stage on the first node, check every node, sbcast,
  verify and move into place) for a folder holding that file.

Then it prints the time to place a 7B F16 model (13.5 GB) on N nodes both ways, from those
rates: N parallel readers share the storage's bandwidth (N x size / B_storage when one reader
already saturates it, which is what it measures here), while sbcast's tree (fan-out F, default 8
in Slurm) forwards blocks as they arrive, so the model crosses each level once:
size / B_sbcast x ceil(log_F N) is the store-and-forward bound (block pipelining makes it closer
to size / B_sbcast). Both are models of a cluster from one host's rates: the README says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
MODEL_7B_F16_GB = 13.5


def read_cold(path: Path) -> float:
    """GB/s of one sequential read of ``path`` with its cached pages dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        while os.read(fd, 16 << 20):
            pass
        return path.stat().st_size / GB / (time.perf_counter() - start)
    finally:
        os.close(fd)


def inside(args: argparse.Namespace) -> dict:
    """Run within the allocation: the three measurements."""
    work = Path(args.work)
    src = work / "model"
    src.mkdir(parents=True, exist_ok=True)
    blob = src / "weights.bin"
    if not blob.exists() or blob.stat().st_size != int(args.size_gb * GB):
        with open(blob, "wb") as fh:
            for _ in range(int(args.size_gb * GB) // (64 << 20)):
                fh.write(os.urandom(64 << 20))
    size = blob.stat().st_size
    reads, sbcasts, whole = [], [], []
    for i in range(args.repeats):
        reads.append(read_cold(blob))
        dest = Path(tempfile.gettempdir()) / f"bench-bcast-{os.getpid()}-{i}.bin"
        start = time.perf_counter()
        subprocess.run(["sbcast", "--force", str(blob), str(dest)], check=True)
        sbcasts.append(size / GB / (time.perf_counter() - start))
        subprocess.run(["srun", "--overlap", "-N2", "-n2", "rm", "-f", str(dest)], check=True)
        root = work / f"shm-{i}" / "$SLURMD_NODENAME"
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "llmpipe.broadcast", str(src), "bench", "--root", str(root)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        whole.append(size / GB / (time.perf_counter() - start))
        record = json.loads(out.stdout)
        assert {n["outcome"] for n in record["nodes"]} <= {"kept", "received"}, record
        subprocess.run(["rm", "-rf", str(work / f"shm-{i}")], check=True)
    return {"size_gb": size / GB, "storage_read": reads, "sbcast": sbcasts, "broadcast": whole}


def placement_table(storage_gb_s: float, sbcast_gb_s: float, fanout: int = 8) -> list[str]:
    lines = [
        f"| nodes | N parallel reads of storage (s) | sbcast tree, fan-out {fanout} (s) | ratio |",
        "|--:|--:|--:|--:|",
    ]
    for n in (2, 4, 8, 16, 64):
        reads = n * MODEL_7B_F16_GB / storage_gb_s
        depth = max(1, math.ceil(math.log(n, fanout)))
        tree = MODEL_7B_F16_GB / sbcast_gb_s * depth
        lines.append(f"| {n} | {reads:.0f} | {tree:.0f} | {reads / tree:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="(inside the allocation)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args)))
        return
    sys.path.insert(0, str(REPO / "tools" / "slurm"))
    from slurm_cluster import LocalSlurmCluster

    state = Path(tempfile.mkdtemp(prefix="bench-bcast-"))
    work = state / "work"
    cluster = LocalSlurmCluster(state / "slurm")
    try:
        cluster.start()
        env = {**os.environ, **cluster.env, "SLURMD_NODENAME": cluster.nodes[0]}
        proc = subprocess.run(
            ["salloc", "-p", cluster.multi_partition, "-N2", "-n2", "--ntasks-per-node=1",
             sys.executable, __file__, "--inside", "--work", str(work),
             "--size-gb", str(args.size_gb), "--repeats", str(args.repeats)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(state)], check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    med = {k: statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    print(f"file {out['size_gb']:.2f} GB, {args.repeats} repeats, medians (GB/s):")
    for key in ("storage_read", "sbcast", "broadcast"):
        values = ", ".join(f"{v:.2f}" for v in out[key])
        print(f"  {key:13s} {med[key]:6.2f}   ({values})")
    print(f"  sbcast / storage read: {med['sbcast'] / med['storage_read']:.2f}")
    print(f"\n7B F16 ({MODEL_7B_F16_GB} GB) on N nodes, from these rates:")
    print("\n".join(placement_table(med["storage_read"], med["sbcast"])))


if __name__ == "__main__":
    main()
