"""A real Slurm cluster of two nodes on localhost for the Slurm tests (and for developers).

`LocalSlurmCluster` starts the real Debian 12 daemons (Slurm 22.05): MariaDB -> slurmdbd, munged,
slurmctld and slurmd, each from its system binary, with configs written into a private state
folder. It mimics the target site: partitions `cpu` (default) and `gpu` on the first node, with
`Gres=gpu:v100d32q:1` backed by a stand-in char device, slurmdbd accounting (so `sacct` works and
records GPU TRES) and an account/user association (so `--account` is checked like on a real site).
A second node (a second slurmd on this host, `slurmd -N`, its own port and spool folder) joins
the first in partition `multi`, for jobs that span nodes; both nodes share this host's file
system, so `sbcast` needs `--force` (the second node finds the first one's copy).
Beside it: slurm_client.py (client commands), slurm_configs.py (the config files),
slurm_processes.py (daemons and /proc), slurm_setup.py (packages, stale configs). The Slurm tests
get it from tests/slurm/conftest.py; tools/slurm/dev_cluster.py keeps one running for development.

Why a stale config costs every `snakemake` start 10 s: once the Slurm client is installed (sinfo
on PATH), importing the Slurm executor plugin, which Snakemake does at every start whatever the
executor, runs `scontrol show config` (10 s timeout) to choose the plugin's status command. With no
config at all (no SLURM_CONF, no /etc/slurm/slurm.conf) scontrol fails at once; with a running
controller behind the config it answers at once; with a config but no controller, or a SLURM_CONF
naming a missing file, it waits out the timeout. So a cluster removes the configs it wrote when it
stops, and `slurm_setup.remove_stale_test_config` clears those a killed session left.

Several clusters can run side by side (e.g. the `tools/slurm/dev_cluster.py up` one and a test
session's): each picks free TCP ports, its own munge socket and its own database socket.

Needs root (munged runs as user `munge`, slurmd launches jobs as their owner, MariaDB runs as root)
and the packages from tools/slurm/install.sh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from slurm_client import SlurmClient, SlurmClusterError
from slurm_configs import CONFIG_FILES, MARKER, SYSTEM_CONF_DIR, write_configs
from slurm_processes import (
    Daemon,
    pids_with_env,
    proc_starttime,
    process_name,
    tail,
    with_descendants,
)

# Put into the environment of every daemon we start. slurmstepd inherits it from slurmd, which is
# how stop() finds job steps that outlived their slurmd (they are not slurmd's children).
ID_ENV = "LLMPIPE_SLURM_CLUSTER_ID"
# Per-cluster runtime folders (munge key/socket + the pid record) live here, not in the state
# folder: munged runs as `munge` and must reach them, while pytest's tmp folders are root-only
# (0700); a unix socket path must also stay under 108 bytes.
RUN_ROOT = Path("/run/llmpipe-slurm")
# Marks a state folder as ours, so the dev tool only ever wipes such a folder.
STATE_MARKER = ".llmpipe-slurm-state"

# sinfo's state of a node whose slurmd has not registered yet.
UNREGISTERED = ("", "UNKNOWN", "UNKNOWN*", "DOWN*")

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def free_ports(count: int) -> list[int]:
    """Free TCP ports outside the kernel's ephemeral range (so clients cannot grab them)."""
    ports: list[int] = []
    candidates = list(range(20000, 30000))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))  # noqa: S104 - probing what slurmd will bind
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise SlurmClusterError("no free TCP ports in 20000-29999")


class LocalSlurmCluster(SlurmClient):
    """A two-node Slurm cluster whose configs, logs, spool and database live in `state_dir`.

    `conf_dir` (default `state_dir/etc`) is where slurm.conf, gres.conf, cgroup.conf and
    slurmdbd.conf are written; pass Path("/etc/slurm") to make the default SLURM_CONF work.
    """

    account = "llmpipe"
    cluster_name = "llmpipe"
    cpu_partition = "cpu"
    gpu_partition = "gpu"
    multi_partition = "multi"
    gpu_type = "v100d32q"

    def __init__(
        self,
        state_dir: Path | str,
        *,
        conf_dir: Path | str | None = None,
        persistent: bool = False,
        cpus: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        super().__init__(Path(conf_dir) if conf_dir else self.state_dir / "etc")
        # persistent=True (dev cluster): no owner process; otherwise a later start of another
        # cluster stops this one once the process that started it is gone (e.g. pytest killed).
        self.persistent = persistent
        # None = the machine's real topology (at least 2 CPUs, so 2-task steps always fit);
        # a number advertises that many CPUs whatever the hardware (jobs asking for more CPUs
        # than a small CI machine has would otherwise pend forever).
        self.cpus = cpus
        self.cluster_id = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]
        self.run_dir = RUN_ROOT / self.cluster_id
        self.munge_dir = self.run_dir / "munge"
        self.record_file = self.run_dir / "cluster.json"
        self.log_dir = self.state_dir / "log"
        self.db_dir = self.state_dir / "mysql"
        self.db_socket = self.db_dir / "mysqld.sock"
        self.hostname = socket.gethostname().split(".")[0]
        self.nodes = (self.hostname, f"{self.hostname}-2")
        self.gpu_devices = {n: self.state_dir / f"fake-gpu{i}" for i, n in enumerate(self.nodes)}
        self.daemons: list[Daemon] = []
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self.timings: dict[str, float] = {}
        self._last_probe = ""
        self._t0 = self._deadline = time.monotonic()

    @property
    def jobs_see_config(self) -> bool:
        """Whether srun inside a job finds this cluster (its config at the default path)."""
        return self.conf_dir == SYSTEM_CONF_DIR

    @property
    def partitions(self) -> tuple[str, str]:
        return (self.cpu_partition, self.gpu_partition)

    @property
    def node_name(self) -> str:
        return self.hostname

    def slurmd_port(self, node: str) -> int:
        return self.ports["slurmd" if node == self.hostname else "slurmd2"]

    def slurmd_daemon_name(self, node: str) -> str:
        return "slurmd" if node == self.hostname else "slurmd2"

    # ----------------------------------------------------------------- configuration

    def _prepare_state(self) -> None:
        (self.state_dir / STATE_MARKER).touch()
        for sub in ("log", "slurmctld", *(f"slurmd/{node}" for node in self.nodes)):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        for device in self.gpu_devices.values():
            if not device.exists():
                os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        # munged insists on its own user owning key, socket folder and log, and on no
        # group/other access to the key.
        munge = pwd.getpwnam("munge")
        RUN_ROOT.mkdir(mode=0o755, exist_ok=True)
        self.run_dir.mkdir(mode=0o755, exist_ok=True)
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)

    # ----------------------------------------------------------------- daemons

    def _spawn(self, name: str, argv: list[str], log: Path, **kwargs) -> Daemon:
        stdout = self.log_dir / f"{name}.stdout"
        env = {
            "PATH": SYSTEM_PATH,
            "SLURM_CONF": str(self.slurm_conf),
            ID_ENV: self.cluster_id,
            "LANG": "C.UTF-8",
            **kwargs.pop("env", {}),
        }
        with open(stdout, "ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=kwargs.pop("cwd", self.state_dir),
                # Own session: a Ctrl-C in pytest or the shell does not hit the daemons, and the
                # dev cluster outlives the `up` command.
                start_new_session=True,
                **kwargs,
            )
        daemon = Daemon(name, popen.pid, proc_starttime(popen.pid), log, stdout, popen)
        self.daemons.append(daemon)
        self._save_record()
        return daemon

    def _wait_for(
        self, daemon: Daemon | None, what: str, check, timeout: float, poll: float = 0.1
    ) -> None:
        """Poll `check()` until true; fail fast (with the daemon's log) if the daemon dies or a
        client probe hits a fatal error (e.g. slurm.conf does not parse)."""
        deadline = min(time.monotonic() + timeout, self._deadline)
        self._last_probe = ""
        while True:
            if check():
                # Seconds since start() began, per milestone: where start-up time goes.
                self.timings[what] = round(time.monotonic() - self._t0, 2)
                return
            problem = None
            if daemon is not None and not daemon.alive():
                problem = f"exited while waiting for {what}"
            elif "fatal:" in self._last_probe:
                problem = f"is running, but a client probe failed fatally waiting for {what}"
            elif time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s waiting for {what}"
            if problem:
                msg = daemon.describe_failure(problem) if daemon else f"{what}: {problem}"
                if self._last_probe:
                    msg += f"\n--- last probe ---\n{self._last_probe}"
                raise SlurmClusterError(msg)
            time.sleep(poll)

    def _probe(self, *args: str, timeout: float = 5) -> subprocess.CompletedProcess[str] | None:
        """Run a readiness probe; its output is kept for the error message if waiting fails."""
        try:
            proc = self.run(*args, timeout=timeout, check=False)
        except SlurmClusterError as exc:
            self._last_probe = str(exc)
            return None
        self._last_probe = f"$ {' '.join(args)}  (rc={proc.returncode})\n{proc.stdout}{proc.stderr}"
        return proc

    def _ok(self, *args: str, timeout: float = 5) -> bool:
        proc = self._probe(*args, timeout=timeout)
        return proc is not None and proc.returncode == 0

    def start(self, timeout: float = 90) -> LocalSlurmCluster:
        """Start every daemon; return only when a test srun ran and sacct has its record.

        `timeout` bounds the whole start-up; each step also has its own, shorter limit.
        """
        self._t0 = t0 = time.monotonic()
        self._deadline = t0 + timeout
        self.timings = {}
        reap_orphaned_clusters()
        if self.record_file.exists() or self.daemons:
            self.stop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        names = ("slurmctld", "slurmd", "slurmd2", "slurmdbd")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        try:
            self._prepare_state()
            write_configs(self)
            self._start_all()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_all(self) -> None:
        log = self.log_dir
        # MariaDB's datadir bootstrap (~2 s) overlaps munged's start.
        fresh_db = not (self.db_dir / "data" / "mysql").is_dir()
        if fresh_db:
            self.db_dir.mkdir(parents=True, exist_ok=True)
            install_log = log / "mariadb-install-db.log"
            with open(install_log, "wb") as out:
                install = subprocess.Popen(
                    ["/usr/bin/mariadb-install-db", "--no-defaults", *self._mariadb_opts(),
                     "--auth-root-authentication-method=socket", "--skip-test-db"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
        try:
            self._start_munged()
        except BaseException:
            if fresh_db:
                install.kill()
                install.wait()
            raise
        if fresh_db:
            try:
                rc = install.wait(timeout=max(1.0, self._deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                install.kill()
                install.wait()
                rc = "timeout"
            if rc != 0:
                raise SlurmClusterError(
                    f"mariadb-install-db failed ({rc}); last lines of {install_log}:\n"
                    f"{tail(install_log)}"
                )
        self._start_database()
        self._start_slurm()

    def _start_munged(self) -> None:
        munge_log = self.munge_dir / "munged.log"
        munged = self._spawn(
            "munged",
            [
                "/usr/sbin/munged", "--foreground", "--force",
                f"--socket={self.munge_dir / 'munge.socket'}",
                f"--key-file={self.munge_dir / 'munge.key'}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
                f"--log-file={munge_log}",
            ],
            munge_log,
            cwd=self.munge_dir,  # the state folder may be root-only
            user="munge",
            group="munge",
            extra_groups=[],
        )  # fmt: skip
        self._wait_for(munged, "munged's socket", (self.munge_dir / "munge.socket").exists, 10)

    def _start_database(self) -> None:
        log = self.log_dir
        mariadb = self._spawn(
            "mariadbd",
            ["/usr/sbin/mariadbd", "--no-defaults", *self._mariadb_opts(),
             "--skip-networking", f"--log-error={log / 'mariadb.log'}",
             f"--pid-file={self.db_dir / 'mariadbd.pid'}"],
            log / "mariadb.log",
        )  # fmt: skip
        self._wait_for(
            mariadb,
            f"MariaDB to answer on {self.db_socket}",
            lambda: self.db_socket.exists()
            and subprocess.run(
                ["/usr/bin/mariadb-admin", "--no-defaults", f"--socket={self.db_socket}",
                 "--user=root", "ping"],
                capture_output=True, timeout=5, check=False,
            ).returncode == 0,
            30,
            poll=0.2,
        )  # fmt: skip

        # slurmdbd reaches MariaDB's private socket through libmariadb's MYSQL_UNIX_PORT.
        dbd = self._spawn(
            "slurmdbd",
            ["/usr/sbin/slurmdbd", "-D"],
            log / "slurmdbd.log",
            env={"MYSQL_UNIX_PORT": str(self.db_socket)},
        )
        self._wait_for(
            dbd,
            "slurmdbd to answer sacctmgr",
            lambda: self._ok("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"),
            30,
            poll=0.3,
        )
        self._add_associations(dbd)

    def _add_associations(self, dbd: Daemon) -> None:
        # Cluster, account and the user association that a job's --account refers to must all be
        # in the database before slurmctld starts: an association added while slurmctld is still
        # coming up is not pushed to it ("Can't find parent id ... for assoc").
        self._sacctmgr(dbd, "add", "cluster", self.cluster_name)
        self._sacctmgr(dbd, "add", "account", self.account, f"cluster={self.cluster_name}",
                       "description=llmpipe tests", "organization=llmpipe")  # fmt: skip
        self._sacctmgr(dbd, "add", "user", "root", f"account={self.account}",
                       f"cluster={self.cluster_name}")  # fmt: skip
        # Jobs without --account land in the project account, as at the target site.
        self._sacctmgr(dbd, "modify", "user", "root", "set", f"defaultaccount={self.account}")
        self.timings["accounts added"] = round(time.monotonic() - self._t0, 2)

    def _start_slurm(self) -> None:
        log = self.log_dir
        dbd = next(d for d in self.daemons if d.name == "slurmdbd")
        ctld = self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"], log / "slurmctld.log")
        slurmds = {
            node: self._spawn(
                self.slurmd_daemon_name(node),
                ["/usr/sbin/slurmd", "-D", "-N", node],
                log / f"slurmd-{node}.log",
            )
            for node in self.nodes
        }
        slurmd = slurmds[self.hostname]
        self._wait_for(
            ctld, "slurmctld to answer `scontrol ping`", lambda: self._ping() == "UP", 30, 0.2
        )
        for node, daemon in slurmds.items():
            self._wait_for(
                daemon,
                f"node {node} to register with slurmctld",
                lambda node=node: self._node_state(node) not in UNREGISTERED,
                30,
                0.2,
            )
            if any(s in self._node_state(node) for s in ("DRAIN", "DOWN", "FAIL")):
                # A drain survives restarts in StateSaveLocation; the node is fine now.
                self.run("scontrol", "update", f"nodename={node}", "state=resume")

        # Readiness = a job really runs (sinfo's "idle" is not enough) and accounting has it.
        try:
            probe = self.run(
                "srun", "-p", self.cpu_partition, "-A", self.account, "-N1", "-n1", "-t", "1",
                "--job-name=llmpipe-ready", "bash", "-c", "echo JOB_ID=$SLURM_JOB_ID",
                timeout=max(5.0, min(30.0, self._deadline - time.monotonic())), check=False,
            )  # fmt: skip
            failure = "" if probe.returncode == 0 else f"rc={probe.returncode}: {probe.stderr}"
        except SlurmClusterError as exc:
            failure = str(exc)
        if failure:
            raise SlurmClusterError(
                f"test srun failed ({failure.strip()})\n"
                + slurmd.describe_failure("is the node daemon")
                + "\n"
                + ctld.describe_failure("is the controller")
            )
        job_id = re.findall(r"JOB_ID=(\d+)", probe.stdout)[-1]
        self._wait_for(
            dbd,
            f"sacct to record test job {job_id}",
            lambda: self.sacct_state(job_id) == "COMPLETED",
            20,
            0.2,
        )

    def _sacctmgr(self, dbd: Daemon, *args: str) -> None:
        proc = self.run("sacctmgr", "-i", *args, check=False)
        # A reused database already has them: "already exists" / "Nothing new added".
        if proc.returncode != 0 and not re.search(
            r"already exists|Nothing (new added|modified)", proc.stdout + proc.stderr
        ):
            raise SlurmClusterError(
                f"`sacctmgr {' '.join(args)}` failed (rc={proc.returncode}): "
                f"{proc.stdout}{proc.stderr}\n" + dbd.describe_failure("is the slurmdbd it asked")
            )

    def _mariadb_opts(self) -> list[str]:
        # Small, unsynced InnoDB: the database is throwaway, and this halves the bootstrap time.
        return [
            f"--datadir={self.db_dir / 'data'}",
            f"--socket={self.db_socket}",
            "--user=root",
            "--skip-name-resolve",
            "--innodb-log-file-size=8M",
            "--innodb-buffer-pool-size=64M",
            "--innodb-flush-method=nosync",
            "--innodb-doublewrite=0",
            "--innodb-flush-log-at-trx-commit=0",
        ]

    def _ping(self) -> str:
        proc = self._probe("scontrol", "ping")
        match = re.search(r"is (UP|DOWN)", proc.stdout) if proc else None
        return match.group(1) if match else ""

    def _node_state(self, node: str | None = None) -> str:
        proc = self._probe("sinfo", "-h", "-N", "-n", node or self.hostname, "-o", "%T")
        out = proc.stdout.strip() if proc else ""
        return out.splitlines()[0].upper() if out else ""

    def is_up(self) -> bool:
        """Controller answers and our daemons are alive (used by the dev `up`/`status`)."""
        return bool(self.daemons) and all(d.alive() for d in self.daemons) and self._ping() == "UP"

    # ----------------------------------------------------------------- stop

    def stop(self, timeout: float = 20) -> None:
        """Cancel jobs, then stop every daemon we started, by pid; wait until they are gone.

        Safe to call more than once and after a failed start.
        """
        if not self.daemons and self.record_file.exists():
            self.load_record()
        errors: list[str] = []
        by_name = {d.name: d for d in self.daemons}
        ctld = by_name.get("slurmctld")
        if ctld is not None and ctld.alive():
            # Jobs first: slurmstepd is not slurmd's child and outlives it otherwise.
            with contextlib.suppress(SlurmClusterError):
                if ids := self._queued_jobs():
                    self.run("scancel", *ids, timeout=5, check=False)
                    deadline = time.monotonic() + 10
                    while self._queued_jobs() and time.monotonic() < deadline:
                        time.sleep(0.2)
        # Slurm daemons first (they flush state to slurmdbd), then the database, then munge.
        for group in (("slurmd", "slurmd2", "slurmctld"), ("slurmdbd",), ("mariadbd", "munged")):
            members = [by_name[n] for n in group if n in by_name]
            for daemon in members:
                daemon.signal(signal.SIGTERM)
            for daemon in members:
                if not daemon.wait_gone(timeout):
                    errors.append(f"{daemon.name} (pid {daemon.pid}) ignored SIGTERM; killed")
                    daemon.signal(signal.SIGKILL)
                    daemon.wait_gone(5)
        for pid in self._leftover_pids():
            errors.append(f"left-over process {pid} ({process_name(pid)}) of this cluster; killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.daemons = []
        with contextlib.suppress(OSError):  # keep munged's log with the others
            shutil.copy(self.munge_dir / "munged.log", self.log_dir / "munged.log")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when no other cluster uses it
            RUN_ROOT.rmdir()
        if errors:
            # Not fatal: the machine is clean now, but say what happened.
            print("[slurm-cluster] stop: " + "; ".join(errors))

    def _queued_jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%A", timeout=5, check=False).stdout.split()

    def _leftover_pids(self) -> list[int]:
        """Live processes carrying our cluster id (job steps), plus their descendants."""
        return with_descendants(pids_with_env(ID_ENV, self.cluster_id))

    # ----------------------------------------------------------------- record (for dev up/down)

    def _save_record(self) -> None:
        record = {
            "state_dir": str(self.state_dir),
            "conf_dir": str(self.conf_dir),
            "owner_pid": None if self.persistent else os.getpid(),
            "owner_starttime": None if self.persistent else proc_starttime(os.getpid()),
            "ports": self.ports,
            "daemons": [
                {"name": d.name, "pid": d.pid, "starttime": d.starttime, "log": str(d.log),
                 "stdout": str(d.stdout)}
                for d in self.daemons
            ],
        }  # fmt: skip
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.record_file)

    def load_record(self) -> bool:
        """Adopt the daemons a previous process started for this state folder (dev `down`)."""
        try:
            record = json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return False
        self.conf_dir = Path(record["conf_dir"])
        self.ports = record.get("ports", {})
        self.daemons = [
            Daemon(d["name"], d["pid"], d["starttime"], Path(d["log"]), Path(d["stdout"]))
            for d in record["daemons"]
        ]
        return True

    def remove_configs(self) -> None:
        """Delete the config files this cluster wrote (MARKER and our state folder in them)."""
        for name in CONFIG_FILES:
            path = self.conf_dir / name
            with contextlib.suppress(OSError):
                text = path.read_text()
                if text.startswith(MARKER) and str(self.state_dir) in text:
                    path.unlink()

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reap_orphaned_clusters() -> list[str]:
    """Stop test clusters whose owning process died without stop() (e.g. pytest was killed)."""
    stopped = []
    if not RUN_ROOT.is_dir():
        return stopped
    for record_file in RUN_ROOT.glob("*/cluster.json"):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        owner = record.get("owner_pid")
        if owner is None:  # a persistent dev cluster: only `down` stops it
            continue
        if proc_starttime(owner) == record.get("owner_starttime"):
            continue  # its owner is still running
        cluster = LocalSlurmCluster(record["state_dir"], conf_dir=record["conf_dir"])
        cluster.load_record()
        cluster.stop()
        stopped.append(record["state_dir"])
    return stopped
