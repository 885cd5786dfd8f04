#!/usr/bin/env python3
"""Keep a local Slurm cluster running while developing: `up`, `down`, `status`, `env`.

    sudo python3 tools/slurm/dev_cluster.py up      # install packages if needed, start (~10 s)
    sudo python3 tools/slurm/dev_cluster.py down    # stop every daemon, remove its configs

It is the Slurm tests' cluster (slurm_cluster.py beside this file), with state in
/tmp/llmpipe-slurm-dev, left running after `up` returns.

Config location: by default the configs go to /etc/slurm, the path every Slurm client reads
when SLURM_CONF is unset. That matters because the Snakemake Slurm plugin, the sbatch it runs
and the jobs it submits all find a controller without any environment set up, and because, with
the Slurm client installed, every `snakemake` start runs `scontrol show config` (10 s timeout):
with a running controller behind /etc/slurm/slurm.conf it answers at once. `down` removes those
files again (only files this tool wrote), so scontrol then fails instantly instead of waiting.
It refuses to touch an /etc/slurm/slurm.conf it did not write; use --private-conf to keep the
configs in the state folder instead (then export SLURM_CONF as `env` prints).

The test suite's own cluster runs alongside (own ports, munge socket and database) and exports
its own SLURM_CONF for the session.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from slurm_client import SlurmClusterError
from slurm_cluster import STATE_MARKER, LocalSlurmCluster
from slurm_configs import MARKER, SYSTEM_CONF_DIR
from slurm_setup import INSTALL_SCRIPT

DEFAULT_STATE = Path("/tmp/llmpipe-slurm-dev")  # noqa: S108 - the documented dev location


def _cluster(args: argparse.Namespace) -> LocalSlurmCluster:
    conf_dir = None if args.private_conf else SYSTEM_CONF_DIR
    cluster = LocalSlurmCluster(args.state, conf_dir=conf_dir, persistent=True)
    cluster.load_record()  # adopt running daemons (and their conf dir), if any
    return cluster


def _print_env(cluster: LocalSlurmCluster) -> None:
    for key, value in cluster.env.items():
        print(f"export {key}={value}")


def _conf_owner_problem(conf_dir: Path, state: Path) -> str | None:
    """Why writing conf_dir/slurm.conf would clobber someone else's config, or None."""
    conf = conf_dir / "slurm.conf"
    if not conf.exists():
        return None
    text = conf.read_text(errors="replace")
    if not text.startswith(MARKER):
        return f"{conf} exists and was not written by this tool (a real site config?)"
    if f"# state: {state.resolve()}\n" not in text:
        other = LocalSlurmCluster(text.split("# state: ", 1)[1].split("\n", 1)[0])
        if other.load_record() and other.is_up():
            return f"{conf} belongs to another running local cluster ({other.state_dir})"
    return None


def cmd_up(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if cluster.daemons and cluster.is_up():
        print(f"[dev-cluster] already up (state {cluster.state_dir}, config {cluster.slurm_conf})")
        _print_env(cluster)
        return 0
    if cluster.daemons:
        print("[dev-cluster] found a broken earlier cluster; stopping it")
        cluster.stop()
    if not args.private_conf and (problem := _conf_owner_problem(SYSTEM_CONF_DIR, args.state)):
        print(f"[dev-cluster] refusing: {problem}; use --private-conf", file=sys.stderr)
        return 1
    if args.state.exists() and any(args.state.iterdir()):
        if not (args.state / STATE_MARKER).exists():
            print(f"[dev-cluster] refusing to wipe {args.state}: not a cluster state folder",
                  file=sys.stderr)  # fmt: skip
            return 1
        shutil.rmtree(args.state)  # always start from a fresh database and spool
    install = subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False)
    if install.returncode != 0:
        print(f"[dev-cluster] {INSTALL_SCRIPT} failed (rc={install.returncode})", file=sys.stderr)
        return 1
    cluster = LocalSlurmCluster(
        args.state,
        conf_dir=None if args.private_conf else SYSTEM_CONF_DIR,
        persistent=True,
        cpus=args.cpus,
    )
    try:
        cluster.start()
    except SlurmClusterError as exc:
        print(f"[dev-cluster] start failed:\n{exc}", file=sys.stderr)
        cluster.remove_configs()
        return 1
    print(f"[dev-cluster] up in {cluster.startup_seconds:.1f} s: state {cluster.state_dir}, "
          f"config {cluster.slurm_conf}, account {cluster.account}, partitions "
          f"{', '.join(cluster.partitions)} (gpu: --gres=gpu:{cluster.gpu_type}:1)")  # fmt: skip
    for daemon in cluster.daemons:
        print(f"  {daemon.name:<9} pid {daemon.pid:<7} log {daemon.log}")
    _print_env(cluster)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    names = ", ".join(f"{d.name} ({d.pid})" for d in cluster.daemons)
    cluster.stop()
    cluster.remove_configs()
    print(f"[dev-cluster] down: stopped {names or 'nothing (no running cluster recorded)'}; "
          f"removed configs from {cluster.conf_dir}")  # fmt: skip
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if not cluster.daemons:
        print("[dev-cluster] down")
        return 1
    for daemon in cluster.daemons:
        print(f"  {daemon.name:<9} pid {daemon.pid:<7} {'alive' if daemon.alive() else 'DEAD'}")
    up = cluster.is_up()
    print(f"[dev-cluster] {'up' if up else 'BROKEN (run `down` then `up`)'}; "
          f"config {cluster.slurm_conf}")  # fmt: skip
    return 0 if up else 1


def cmd_env(args: argparse.Namespace) -> int:
    _print_env(_cluster(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--state", type=Path, default=DEFAULT_STATE, help=f"state folder (default {DEFAULT_STATE})"
    )
    parser.add_argument(
        "--private-conf",
        action="store_true",
        help="write the configs into the state folder, not /etc/slurm",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="advertise this many CPUs (default: this machine's, >= 2)",
    )
    args = parser.parse_args(argv)
    args.state = args.state.resolve()
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
