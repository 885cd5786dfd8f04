"""RPC endpoints from config or the allocation are checked before anything connects."""

from __future__ import annotations

import pytest

from llmpipe.errors import ConfigError
from llmpipe.evaluation import rpc


@pytest.mark.parametrize("bad", ["node1", "node1:0", "no de:50052", "-x:1", "host:99999"])
def test_endpoints_are_checked(bad):
    with pytest.raises(ConfigError, match="host:port"):
        rpc.check_endpoint(bad)


def test_the_node_side_refuses_a_bad_host():
    with pytest.raises(ConfigError, match="host:port"):
        rpc.main(["serve", "bad host", "1", "/nonexistent/port"])
