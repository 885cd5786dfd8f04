"""The resource sampler: peaks it reports are real, and a GPU step fails fast without a GPU."""

from __future__ import annotations

import pytest

from llmpipe.errors import ResourceError
from llmpipe.monitor import ResourceMonitor, require_gpu


def test_monitor_sees_an_allocation(tmp_path):
    with ResourceMonitor(interval=0.05) as mon:
        block = bytearray(300 * 2**20)  # 300 MiB, touched
        block[::4096] = b"x" * len(block[::4096])
        del block
    summary = mon.summary()
    assert summary["peak_rss_mb"] >= 300
    assert summary["samples"] >= 1 and summary["wall_s"] > 0
    assert summary["peak_gpu_mem_mb"] is None  # no GPU on this machine
    mon.write_timeseries(tmp_path / "ts.tsv")
    lines = (tmp_path / "ts.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["t_s", "rss_mb", "cpu_pct"]
    assert len(lines) == summary["samples"] + 1


def test_gpu_step_without_gpu_fails_fast_unless_cpu_allowed():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ResourceError, match="evaluate: needs a GPU.*allow_cpu: true"):
        require_gpu(allow_cpu=False, step="evaluate")
    facts = require_gpu(allow_cpu=True, step="evaluate")
    assert facts["cuda_available"] is False and facts["torch"].startswith("2.13")
