"""Slurm client commands (sbatch, sacct, scontrol) against one cluster, named by its slurm.conf."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started (or a client command failed)."""


def parse_tres(text: str) -> dict[str, str]:
    """'cpu=1,mem=1000M,gres/gpu=1' -> {'cpu': '1', 'mem': '1000M', 'gres/gpu': '1'}."""
    out = {}
    for item in text.strip().split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            out[key] = value
    return out


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol -o show ...` line -> {key: value} (values may contain spaces)."""
    pairs = re.findall(r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s[A-Za-z][\w/:.]*=|$)", line.strip())
    return dict(pairs)


@dataclass(frozen=True)
class JobResources:
    """What Slurm itself recorded for a job: sacct's AllocTRES/ReqTRES and `scontrol show job`."""

    job_id: str
    alloc_tres: dict[str, str]
    req_tres: dict[str, str]
    scontrol: dict[str, str]  # empty once the controller has purged the job (MinJobAge)

    @property
    def gpus(self) -> int:
        """GPUs allocated according to the accounting record (gres/gpu TRES)."""
        return int(self.alloc_tres.get("gres/gpu", "0"))

    @property
    def gres(self) -> str:
        """The requested gres as the controller shows it, e.g. 'gres:gpu:v100d32q:1'."""
        return self.scontrol.get("TresPerNode", "")


class SlurmClient:
    """Runs Slurm client commands against the cluster whose slurm.conf is in `conf_dir`."""

    def __init__(self, conf_dir: Path) -> None:
        self.conf_dir = conf_dir

    @property
    def slurm_conf(self) -> Path:
        return self.conf_dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a Slurm client needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.slurm_conf)}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env

    def run(
        self, *args: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, sacct, ...) against this cluster."""
        try:
            proc = subprocess.run(
                list(args),
                env=self.client_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmClusterError(f"`{' '.join(args)}` timed out after {timeout} s") from exc
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"`{' '.join(args)}` failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str) -> str:
        """Submit with sbatch --parsable and return the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def sacct_state(self, job_id: str) -> str:
        """The job's state in the accounting database ('' while it has no record yet)."""
        out = self.run(
            "sacct", "-j", job_id, "-X", "-n", "-P", "--format=JobID,State", check=False
        ).stdout
        for line in out.splitlines():
            jid, _, state = line.partition("|")
            if jid == job_id:
                return state.split()[0] if state else ""
        return ""

    def controller_state(self, job_id: str) -> str:
        """The job's state as slurmctld sees it now ('' once purged after MinJobAge)."""
        show = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return (
            parse_scontrol_record(show.stdout).get("JobState", "") if show.returncode == 0 else ""
        )

    def wait_for_state(
        self,
        job_id: str,
        states: Sequence[str],
        timeout: float = 30,
        poll: float = 0.2,
        *,
        via: str = "sacct",
    ) -> str:
        """Poll until the job reaches one of `states` (e.g. COMPLETED).

        via="sacct" asks the accounting database (what the Snakemake plugin polls); it learns
        that a job started a few seconds late, so wait for RUNNING via="scontrol".
        """
        query = {"sacct": self.sacct_state, "scontrol": self.controller_state}[via]
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = query(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise SlurmClusterError(
            f"job {job_id} not in {list(states)} after {timeout} s ({via} says {state!r});\n"
            f"{self.run('scontrol', 'show', 'job', job_id, check=False).stdout}"
        )

    def job_resources(self, job_id: str, settle: float = 10) -> JobResources:
        """Allocated/requested TRES from sacct plus the controller's `scontrol show job` record.

        slurmdbd is eventually consistent: for a short job the end record (AllocTRES, state
        COMPLETED) can arrive seconds before the start record that carries ReqTRES. So poll up to
        `settle` seconds until both are there (a job cancelled while pending never gets them).
        """
        deadline = time.monotonic() + settle
        while True:
            out = self.run(
                "sacct", "-j", job_id, "--format=JobID,AllocTRES%80,ReqTRES%80", "-P", "-n"
            ).stdout
            alloc: dict[str, str] = {}
            req: dict[str, str] = {}
            for line in out.splitlines():
                jid, alloc_text, req_text = (line.split("|") + ["", ""])[:3]
                if jid == job_id:  # the allocation line, not .batch/.extern/steps
                    alloc, req = parse_tres(alloc_text), parse_tres(req_text)
            if (alloc and req) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        show = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        record = parse_scontrol_record(show.stdout) if show.returncode == 0 else {}
        return JobResources(job_id, alloc, req, record)
