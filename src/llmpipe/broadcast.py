"""One copy to every node: stage a model once and broadcast it to the RAM disk of every node of a
Slurm allocation with ``sbcast`` (Slurm's fan-out tree), instead of N nodes reading shared
storage at once.

Run by a job of several nodes (multi-node fine-tune, an RPC evaluation), on its first node::

    python -m llmpipe.broadcast SRC NAME --root /dev/shm [--verify size|sha256]

1. **this node** stages ``SRC`` as ``stage.ensure_staged`` does (reused when a verified copy is
   there already);
2. **every node** checks its own copy (``srun`` one task per node: ``status``); when all are
   usable, nothing moves;
3. otherwise the staged files (and their manifest) go to every node with ``sbcast --force``
   into an incoming folder, and **every node** adopts them (``adopt``): it verifies them against
   the manifest (sizes, or sha256) and moves them into place under the same lock, marker and
   fingerprint as a local copy; a node whose incoming copy is missing or damaged stages from
   ``SRC`` itself, and says so.

The record (JSON on stdout) holds each node's outcome, the bytes, the sbcast seconds and GB/s.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from llmpipe import atomic, stage
from llmpipe import manifest as mf
from llmpipe.errors import IntegrityError, PipelineError

MANIFEST_NAME = ".llmpipe-bcast-manifest.json"


def copy_dir(root: str | os.PathLike, name: str, manifest: dict) -> Path:
    """Where ``stage.ensure_staged`` keeps this content on this node."""
    return stage.stage_dir(root) / f"{name}-{mf.fingerprint(manifest)}"


def incoming_dir(root: str | os.PathLike, name: str, manifest: dict) -> Path:
    """Where sbcast writes, as the first node names it (the other nodes are told the path: a
    root may hold ``$SLURMD_NODENAME``, which differs per node); one per job."""
    job = stage.current_job() or "local"
    return stage.stage_dir(root) / f".{name}-{mf.fingerprint(manifest)}.incoming-{job}"


def node_status(root, name: str, manifest: dict, verify: str) -> dict:
    """This node's copy: usable or not, and why."""
    dest = copy_dir(root, name, manifest)
    with atomic.file_lock(dest.parent / f".{dest.name}.lock"):
        reason = stage._usable(dest, manifest, verify)
    return _node_record(usable=reason is None, reason=reason)


def adopt(
    src, root, name: str, manifest: dict, incoming: Path, verify: str, reserve_gb: float = 1.0
) -> dict:
    """Take this node's broadcast copy (in ``incoming``) into place after checking it; redo a
    bad one from ``src``. Returns what happened on this node."""
    dest = copy_dir(root, name, manifest)
    incoming = Path(incoming)
    start = time.perf_counter()
    with atomic.file_lock(dest.parent / f".{dest.name}.lock"):
        if stage._usable(dest, manifest, verify) is None:
            return _node_record(usable=True, outcome="kept", seconds=time.perf_counter() - start)
        problem = None
        try:
            payload = stage._payload(incoming, manifest)
            mf.verify(payload, manifest, check_hash=verify == "sha256")
        except IntegrityError as err:
            problem = str(err)
        if problem is None:
            shutil.rmtree(dest, ignore_errors=True)
            with atomic.atomic_dir(dest) as tmp:
                for rel in manifest["files"]:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    _move(incoming / rel, tmp / rel)
                (tmp / stage.MARKER).write_text(json.dumps(stage_marker(src, manifest)))
            return _node_record(
                usable=True, outcome="received", seconds=time.perf_counter() - start
            )
    # Outside the lock: ensure_staged takes it itself.
    record = stage.ensure_staged(src, manifest, root, name, verify, reserve_gb)
    return _node_record(
        usable=True, outcome="restaged", reason=problem, seconds=time.perf_counter() - start,
        gb_per_s=record.get("gb_per_s"),
    )  # fmt: skip


def _move(src: Path, dest: Path) -> None:
    """A rename on the RAM disk (free, and the memory is not held twice); a copy across file
    systems."""
    try:
        os.replace(src, dest)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dest)


def stage_marker(src, manifest: dict) -> dict:
    return {
        "fingerprint": mf.fingerprint(manifest),
        "host": socket.gethostname(),
        "job": stage.current_job(),
        "source": str(src),
        "via": "sbcast",
    }


def _node_record(**fields) -> dict:
    if "seconds" in fields:
        fields["seconds"] = round(fields["seconds"], 4)
    return {"node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
            "host": socket.gethostname(), **fields}  # fmt: skip


def _on_every_node(nodes: int, args: list[str]) -> list[dict]:
    """Run ``python -m llmpipe.broadcast <args>`` once per node; one JSON line back from each."""
    command = [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--overlap",
        "--kill-on-bad-exit=1", sys.executable, "-m", "llmpipe.broadcast", *args,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PipelineError(f"{' '.join(command[:6])} … failed: {proc.stderr.strip()[-2000:]}")
    return sorted(
        (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
        key=lambda r: r["node"],
    )


def broadcast(
    src: str | os.PathLike,
    name: str,
    root: str | os.PathLike,
    *,
    verify: str = "size",
    reserve_gb: float = 1.0,
    fanout: int | None = None,
    manifest: dict | None = None,
) -> dict:
    """A verified copy of ``src`` on the RAM disk of every node of this Slurm allocation.
    ``manifest``: the source's own (a model folder's, with sha256, which a copy made by another
    job is re-hashed against); None: built here (sha256 only with ``verify`` sha256)."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 0)
    if nodes < 1:
        raise PipelineError("broadcast runs inside a Slurm allocation (no SLURM_JOB_NUM_NODES)")
    if manifest is None:
        manifest = (
            stage.file_manifest(src, hash_files=verify == "sha256")
            if Path(src).is_file()
            else mf.build(src, hash_files=verify == "sha256")
        )
    first = stage.ensure_staged(src, manifest, root, name, verify, reserve_gb)
    dest = copy_dir(root, name, manifest)
    incoming = incoming_dir(root, name, manifest)
    manifest_file = incoming / MANIFEST_NAME
    incoming.mkdir(parents=True, exist_ok=True)
    atomic.write_json(manifest_file, manifest)
    common = ["--manifest", str(manifest_file), "--incoming", str(incoming), "--verify", verify,
              "--reserve-gb", str(reserve_gb), str(src), name, "--root", str(root)]  # fmt: skip
    # The manifest must reach the other nodes first: sbcast it, then ask every node.
    sbcast_s = 0.0
    moved = 0
    try:
        _srun_mkdir(nodes, [str(incoming)])
        _sbcast(manifest_file, manifest_file, fanout)
        status = _on_every_node(nodes, ["--node-step", "status", *common])
        if all(r["usable"] for r in status):
            nodes_out = [{**r, "outcome": "kept"} for r in status]
        else:
            start = time.perf_counter()
            folders = sorted({str((incoming / rel).parent) for rel in manifest["files"]})
            _srun_mkdir(nodes, folders)
            for rel in manifest["files"]:
                _sbcast(dest / rel, incoming / rel, fanout)
                moved += manifest["files"][rel]["size"]
            sbcast_s = time.perf_counter() - start
            adopted = _on_every_node(nodes, ["--node-step", "adopt", *common])
            # What each node's own copy was before (missing, damaged …) beside what it did.
            before = {r["node"]: r["reason"] for r in status}
            nodes_out = [{**r, "before": before.get(r["node"])} for r in adopted]
    finally:
        with_nodes = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                      "--overlap", "rm", "-rf", str(incoming)]  # fmt: skip
        subprocess.run(with_nodes, capture_output=True, check=False)
    return {
        "source": str(src),
        "path": first["path"],
        "nodes": nodes_out,
        "bytes": manifest["total_bytes"],
        "broadcast_bytes": moved,
        "sbcast_s": round(sbcast_s, 4),
        "sbcast_gb_per_s": round(moved / stage.GB / sbcast_s, 3) if sbcast_s else None,
        "first_node": {k: first[k] for k in ("hit", "seconds", "gb_per_s", "host")},
        "verify": verify,
        "fanout": fanout,
        "job": stage.current_job(),
    }


def _srun_mkdir(nodes: int, folders: list[str]) -> None:
    """The folders sbcast writes into, on every node (sbcast makes files, not folders)."""
    subprocess.run(
        ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--overlap",
         "mkdir", "-p", *folders],
        capture_output=True, check=True,
    )  # fmt: skip


def _sbcast(src: Path, dest: Path, fanout: int | None) -> None:
    command = ["sbcast", "--force", "--preserve"]
    if fanout:
        command.append(f"--fanout={fanout}")
    proc = subprocess.run([*command, str(src), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"sbcast {src} -> {dest} failed: {proc.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmpipe.broadcast", description=__doc__)
    parser.add_argument("--node-step", choices=("status", "adopt"),
                        help="(internal) the step each node runs under srun")  # fmt: skip
    parser.add_argument("src")
    parser.add_argument("name")
    parser.add_argument("--root", required=True)
    parser.add_argument("--verify", choices=("size", "sha256"), default="size")
    parser.add_argument("--reserve-gb", type=float, default=1.0)
    parser.add_argument("--fanout", type=int)
    parser.add_argument("--manifest", help="(status/adopt) the manifest the first node wrote")
    parser.add_argument("--incoming", help="(adopt) where sbcast wrote this node's copy")
    parser.add_argument("--source-manifest", help="the source's manifest (default: built)")
    args = parser.parse_args(argv)
    if args.node_step is None:
        out = broadcast(args.src, args.name, args.root, verify=args.verify,
                        reserve_gb=args.reserve_gb, fanout=args.fanout)  # fmt: skip
        print(json.dumps(out, indent=2))
        return 0
    manifest = mf.load(args.manifest)
    if args.node_step == "status":
        out = node_status(args.root, args.name, manifest, args.verify)
    else:
        out = adopt(args.src, args.root, args.name, manifest, Path(args.incoming), args.verify,
                    args.reserve_gb)  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
