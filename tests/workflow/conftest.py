"""Workflow tests run Snakemake locally and need no Slurm cluster.

Where the Slurm client is installed, every `snakemake` start probes `scontrol show config`,
which fails at once without a config and answers at once with a running controller, but waits
10 s on a config without one (tools/slurm/slurm_cluster.py). So before the first workflow test,
clear what a killed test session left behind: its configs in /etc/slurm, or a SLURM_CONF naming
a file that is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_setup import remove_stale_test_config


@pytest.fixture(scope="session", autouse=True)
def _no_stale_slurm_config() -> Iterator[None]:
    remove_stale_test_config()
    with pytest.MonkeyPatch.context() as mp:
        conf = os.environ.get("SLURM_CONF")
        if conf and not Path(conf).is_file():
            mp.delenv("SLURM_CONF")
        yield
