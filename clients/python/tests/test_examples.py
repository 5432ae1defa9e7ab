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
