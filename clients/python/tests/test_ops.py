"""The operations listener (`[ops]`): `/metrics` — and on the cloud the operator API and
the dashboard — on their own address and off the client listener, `/metrics` behind a
bearer token."""

from __future__ import annotations

from pathlib import Path
from typing import List

import httpx
import pytest

from .conftest import SECRET, Proc, free_port, free_udp_port, sha256, start_node

METRICS_TOKEN = "metrics-token-0123456789abcdef"
OPERATOR_KEY = "opk_ops_listener_test_key_0123456789"


def node(tmp_path: Path, name: str, binary: str, extra: str) -> "tuple[Proc, str]":
    ops = free_port()
    p = start_node(
        tmp_path,
        name,
        binary,
        f"{extra}\n"
        f'[ops]\nlisten = "127.0.0.1:{ops}"\nmetrics_token_sha256 = "{sha256(METRICS_TOKEN)}"\n'
        f'[auth]\nhs256_secret = "{SECRET}"\noperator_keys = [{{ name = "ops", sha256 = "{sha256(OPERATOR_KEY)}" }}]\n',
    )
    p.wait_ready()
    return p, f"http://127.0.0.1:{ops}"


@pytest.fixture
def procs():
    started: List[Proc] = []
    yield started
    for p in started:
        p.stop()


def test_metrics_and_the_operator_api_move_to_the_ops_listener(tmp_path: Path, procs: List[Proc]) -> None:
    edge, edge_ops = node(tmp_path, "edge", "outpost-edge", 'region = "ops-test"')
    procs.append(edge)
    assert httpx.get(edge.url + "/metrics").status_code == 404, "metrics still on the client listener"
    r = httpx.get(edge_ops + "/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(edge_ops + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.get(edge_ops + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200 and "outpost_connections" in r.text, r.text[:200]
    assert httpx.get(edge_ops + "/readyz").status_code == 200
    # Clients are served on the client listener as before, and not on the ops one.
    assert httpx.get(edge.url + "/readyz").status_code == 200
    assert httpx.get(edge_ops + "/v1/channels/project:1/history").status_code == 404

    cloud, cloud_ops = node(tmp_path, "cloud", "outpost-cloud", f'region = "cloud"\ndev = true\n[hub]\nlisten = "127.0.0.1:{free_udp_port()}"')
    procs.append(cloud)
    key = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    assert httpx.get(cloud.url + "/v1/admin/edges", headers=key).status_code == 404
    assert httpx.get(cloud.url + "/dashboard").status_code == 404
    r = httpx.get(cloud_ops + "/v1/admin/edges", headers=key)
    assert r.status_code == 200 and "edges" in r.json(), r.text
    assert httpx.get(cloud_ops + "/v1/admin/edges").status_code == 401
    assert httpx.get(cloud_ops + "/dashboard").status_code == 200
