"""This machine and the local cluster: install its packages, say why none can run, clear the
configs a killed session left in /etc/slurm (see slurm_cluster.py for why they cost 10 s)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from slurm_configs import CONFIG_FILES, MARKER, SYSTEM_CONF_DIR

INSTALL_SCRIPT = Path(__file__).resolve().parent / "install.sh"


def install_packages() -> tuple[bool, str]:
    """Run tools/slurm/install.sh; (ok, output)."""
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, f"{INSTALL_SCRIPT} timed out after 900 s"
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def remove_stale_test_config(conf_dir: Path = SYSTEM_CONF_DIR) -> bool:
    """Remove the configs in `conf_dir` if this harness wrote them and their controller no
    longer answers (a killed session could not clean up); True when it removed them."""
    conf = conf_dir / "slurm.conf"
    try:
        if not conf.read_text().startswith(MARKER):
            return False
    except OSError:
        return False
    try:
        ping = subprocess.run(
            ["scontrol", "ping"],
            env={**os.environ, "SLURM_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if "UP" in ping.stdout:
            return False
    except (OSError, subprocess.TimeoutExpired):
        pass
    for name in CONFIG_FILES:
        (conf_dir / name).unlink(missing_ok=True)
    return True


def unavailable_reason() -> str | None:
    """Why no local cluster can run on this machine (installing the packages if needed)."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (munged, slurmd, MariaDB); running as non-root"
    if os.environ.get("LLMPIPE_SLURM") == "0":  # a developer's run of some tests, beside another
        return "LLMPIPE_SLURM=0: no local Slurm cluster for this session"
    ok, output = install_packages()
    if not ok:
        last = "\n".join(output.splitlines()[-15:])
        return f"cannot install the Slurm packages with {INSTALL_SCRIPT}:\n{last}"
    return None
