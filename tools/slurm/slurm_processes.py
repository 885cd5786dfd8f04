"""The local cluster's processes, read from /proc: start times, descendants, the daemons.

A pid is only ever trusted together with its start time, so a recycled pid is never mistaken for
(or killed as) one of the cluster's daemons.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log, or why it cannot be read."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text[-lines:]) if text else "(empty)"


def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # orphans may stay zombies a while (PID 1 reaps late): gone for us
        return None
    return int(fields[19])


@dataclass
class Daemon:
    """One daemon the cluster started: pid and start time, its log file and captured stdout."""

    name: str
    pid: int
    starttime: int | None
    log: Path
    stdout: Path
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        start = proc_starttime(self.pid)
        # Compare start times so a recycled pid is never mistaken for (or killed as) our daemon.
        return start is not None and (self.starttime is None or start == self.starttime)

    def describe_failure(self, what: str) -> str:
        parts = [f"{self.name} (pid {self.pid}) {what}"]
        if self.popen is not None and self.popen.poll() is not None:
            parts[0] += f" [exit code {self.popen.returncode}]"
        log_tail = tail(self.log)
        parts.append(f"--- last lines of {self.log} ---\n{log_tail}")
        # With -D most daemons copy their log to stdout; show it only when it adds something
        # (e.g. a fatal config error printed before the log file was opened).
        out_tail = tail(self.stdout, 10)
        last = out_tail.splitlines()[-1].split(": ", 1)[-1] if out_tail else ""
        if self.stdout != self.log and last not in log_tail:
            parts.append(f"--- last lines of {self.stdout} ---\n{out_tail}")
        return "\n".join(parts)

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the daemon has exited; False if it is still there after `timeout` s."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def pids_with_env(key: str, value: str) -> list[int]:
    """Live processes whose environment has `key=value`."""
    marker = f"{key}={value}".encode()
    pids = []
    for pid in all_pids():
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
    return pids


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def with_descendants(roots: list[int]) -> list[int]:
    """The live processes among `roots` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out and proc_starttime(pid) is not None:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out
