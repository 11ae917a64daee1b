"""The load test (edlm.bench.load) against a real server."""

import pytest
from serve_helpers import KEY

from edlm.bench.load import load_test

pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_load_test_loses_nothing(server):
    srv, _, _ = server
    result = load_test(srv.base_url, n_requests=16, concurrency=4, max_tokens=16, disconnect=1, api_key=KEY)
    assert (result["succeeded"], result["failed"], result["lost"], result["duplicated"]) == (15, 0, 0, 0)
    assert result["mismatched"] == [] and result["disconnected_prefix_ok"]
    assert result["distinct_outputs"] >= 10  # responses differ by prompt, so a mix-up would show
    server_side = result["server"]
    assert (server_side["rows"], server_side["completed"], server_side["cancelled"]) == (16, 15, 1)
    assert server_side["active_after"] == server_side["waiting_after"] == 0
    assert result["completion_tokens"] == 15 * 16 and result["requests_per_s"] > 0
    with pytest.raises(Exception, match="loopback"):
        load_test("http://example.com:80", n_requests=1)
