"""The examples under examples/, run as their README says, against the test fleet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .conftest import API_KEY, REPO, Fleet

CHAIN = REPO / "examples" / "service-chain"


def run(script: str, *args: str, endpoints: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OUTPOST_ENDPOINTS": endpoints, "OUTPOST_API_KEY": API_KEY}
    env.pop("OUTPOST_TOKEN", None)
    return subprocess.Popen([sys.executable, str(CHAIN / script), *args], env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT)


def lines(path: Path, prefix: str) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.startswith(prefix))


def test_service_chain_survives_a_relay_killed_mid_stream(fleet: Fleet, tmp_path: Path, channel: str):
    a, b = fleet["a"].url, fleet["b"].url
    position = tmp_path / "relay.position"
    producer = run("producer.py", channel, "200", "0.01", endpoints=a, out=tmp_path / "producer.out")
    relay = run("relay.py", channel, str(position), endpoints=b, out=tmp_path / "relay-1.out")
    try:
        deadline = time.monotonic() + 60
        while lines(tmp_path / "relay-1.out", "reported") < 50:
            assert time.monotonic() < deadline, (tmp_path / "relay-1.out").read_text()
            assert relay.poll() is None, (tmp_path / "relay-1.out").read_text()
            time.sleep(0.05)
        relay.kill()  # kill -9, mid-stream: no chance to save anything
        relay.wait()
        time.sleep(0.5)  # the producer goes on meanwhile
        relay = run("relay.py", channel, str(position), endpoints=b, out=tmp_path / "relay-2.out")
        assert producer.wait(120) == 0, (tmp_path / "producer.out").read_text()
        check = subprocess.run(
            [sys.executable, str(CHAIN / "check.py"), channel, "200", "20"],
            env={**os.environ, "OUTPOST_ENDPOINTS": a, "OUTPOST_API_KEY": API_KEY},
            capture_output=True,
            text=True,
            timeout=120,
        )
        print(check.stdout)
        assert check.returncode == 0, check.stdout + check.stderr + (tmp_path / "relay-2.out").read_text()
        assert "200 reports, 0 duplicates, in order, none missing" in check.stdout
        assert "from the saved position" in (tmp_path / "relay-2.out").read_text()
    finally:
        for p in (producer, relay):
            if p.poll() is None:
                p.kill()


FLOW = REPO / "examples" / "flow-events-sse"


def test_flow_events_reach_a_plain_eventsource_across_an_edge_restart(fleet: Fleet, tmp_path: Path, channel: str):
    """examples/flow-events-sse: a service publishes canvas, execution updates and a
    streamed answer; a page with nothing but EventSource renders them. The page's edge
    is killed mid-stream and restarted: EventSource reconnects with Last-Event-ID and
    the page ends up whole, with no duplicate."""
    import json
    import shutil

    import pytest

    from .conftest import token

    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if node is None or not Path(chromium).exists() or not (REPO / "tests" / "browser" / "node_modules" / "playwright-core").exists():
        pytest.skip("needs node, Chromium and tests/browser/node_modules (scripts/test installs them)")
    sys.path.insert(0, str(FLOW))
    try:
        import service  # the example's own text and chunks: what the page must show
    finally:
        sys.path.remove(str(FLOW))
    flow = "flow:" + channel.split(":", 1)[1]
    cfg = {
        "page": str(FLOW / "page.html"),
        "endpoint": fleet["a"].url,
        "channel": flow,
        "token": token([flow], actions=["subscribe"]),
        "expectLog": service.ANSWER,
        "nodes": len(service.NODES),
        "timeoutMs": 60000,
    }
    browser = subprocess.Popen([node, str(REPO / "tests" / "browser" / "flow-sse.mjs"), json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
    pub = None
    try:
        assert browser.stdout is not None
        assert json.loads(browser.stdout.readline()).get("ready"), "the page did not connect"
        # The service publishes through edge b; the page reads from edge a.
        pub = run_flow_service(flow, fleet["b"].url, tmp_path / "service.out")
        time.sleep(0.6)  # some of the answer has streamed
        fleet["a"].kill()
        time.sleep(0.5)
        fleet["a"].start()
        fleet["a"].wait_ready()
        assert pub.wait(60) == 0, (tmp_path / "service.out").read_text()
        out = json.loads(browser.stdout.readline())
        assert browser.wait(70) == 0
        assert out["ok"], out
        assert out["duplicates"] == 0 and out["text"] == service.ANSWER
        assert out["opens"] >= 2, f"the page never lost its edge: {out}"
    finally:
        for p in (browser, pub):
            if p is not None and p.poll() is None:
                p.kill()
        fleet.wait_linked("a")


def run_flow_service(flow: str, endpoints: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OUTPOST_ENDPOINTS": endpoints, "OUTPOST_API_KEY": API_KEY}
    env.pop("OUTPOST_TOKEN", None)
    return subprocess.Popen([sys.executable, str(FLOW / "service.py"), flow, "0.02"], env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT)
