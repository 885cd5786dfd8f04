"""The resource sampler: the peaks it reports are real (GPU checks: tests/unit/test_hardware.py)."""

from __future__ import annotations

from llmpipe.monitor import ResourceMonitor


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
