"""Behind a reverse proxy (`limits.trusted_proxies`): per-IP limits apply to the
client that a trusted proxy names in `X-Forwarded-For`, and a client that is not a
trusted proxy cannot pick its address with that header."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List

import httpx
import pytest
import websockets

from .conftest import API_KEY, COMMON, Proc, start_node


def edge(tmp_path: Path, name: str, extra: str) -> Proc:
    p = start_node(tmp_path, name, "outpost-edge", f"[limits]\nmax_connections_per_ip = 2\n{extra}\n" + COMMON)
    p.wait_ready()
    return p


async def open_ws(p: Proc, forwarded_for: str) -> Any:
    """A WebSocket as a proxy would open it for `forwarded_for`; None if refused."""
    url = p.url.replace("http://", "ws://") + "/v1/ws"
    try:
        ws = await websockets.connect(url, additional_headers={"X-Api-Key": API_KEY, "X-Forwarded-For": forwarded_for})
    except websockets.exceptions.InvalidStatus as e:
        assert e.response.status_code == 429, e
        return None
    assert json.loads(await ws.recv())["type"] == "connected"
    return ws


@pytest.fixture
def proc_cleanup():
    procs: List[Proc] = []
    yield procs
    for p in procs:
        p.stop()


async def test_per_ip_limits_follow_the_client_a_trusted_proxy_names(tmp_path: Path, proc_cleanup: List[Proc]) -> None:
    trusting = edge(tmp_path, "behind-proxy", 'trusted_proxies = ["127.0.0.1"]')
    proc_cleanup.append(trusting)
    open_ = [await open_ws(trusting, "203.0.113.5") for _ in range(2)]
    assert all(open_), "the first two from one client are accepted"
    assert await open_ws(trusting, "203.0.113.5") is None, "a third from the same client is refused"
    other = await open_ws(trusting, "198.51.100.7, 127.0.0.1")  # another client, through two proxies
    assert other is not None, "another client behind the same proxy is not limited by the first"
    for ws in [*open_, other]:
        await ws.close()

    # Without trusted proxies the header is the client's own claim: ignored.
    plain = edge(tmp_path, "no-proxy", "")
    proc_cleanup.append(plain)
    first = [await open_ws(plain, f"203.0.113.{i}") for i in (1, 2)]
    assert all(first)
    assert await open_ws(plain, "203.0.113.3") is None, "X-Forwarded-For from a non-proxy changed the limit"
    for ws in first:
        await ws.close()
    # A REST answer still works for either (the limit is on WebSockets and SSE).
    assert httpx.get(plain.url + "/readyz", headers={"X-Forwarded-For": "1.2.3.4"}).status_code == 200
