"""RPC endpoints from config or the allocation are checked before anything connects."""

from __future__ import annotations

import pytest

from llmpipe.errors import ConfigError
from llmpipe.evaluation import rpc


@pytest.mark.parametrize("bad", ["node1", "node1:0", "no de:50052", "-x:1", "host:99999"])
def test_endpoints_are_checked(bad):
    with pytest.raises(ConfigError, match="host:port"):
        rpc.check_endpoint(bad)


def test_a_port_per_job_and_node(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    ports = [rpc.job_port(i) for i in range(4)]
    assert len(set(ports)) == 4 and all(1024 < p < 65536 for p in ports)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert not set(ports) & {rpc.job_port(i) for i in range(4)}
