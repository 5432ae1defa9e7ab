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


MEETING = REPO / "examples" / "meeting-commands"


def run_meeting_service(endpoints: str, positions: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OUTPOST_ENDPOINTS": endpoints, "OUTPOST_API_KEY": API_KEY}
    env.pop("OUTPOST_TOKEN", None)
    return subprocess.Popen([sys.executable, str(MEETING / "service.py"), str(positions)], env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT)


def wait_for(what: str, cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_meeting_commands_reach_one_service_with_who_sent_them_across_a_service_kill(fleet: Fleet, tmp_path: Path, channel: str):
    """examples/meeting-commands: two participants on two edges, one service on the
    cloud subscribed to every meeting's commands. Ada pauses (both pages show who did);
    the service is killed with SIGKILL; Grace turns recording on while it is down; the
    restarted service resumes from its saved positions and acts on it; every command
    is acted on exactly once."""
    import json
    import shutil

    import pytest

    from .conftest import token

    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if node is None or not Path(chromium).exists() or not (REPO / "tests" / "browser" / "node_modules" / "playwright-core").exists():
        pytest.skip("needs node, Chromium and tests/browser/node_modules (scripts/test installs them)")
    meeting = "meeting:" + channel.split(":", 1)[1]
    rights = ["subscribe", "publish", "presence"]
    cfg = {
        "page": str(MEETING / "page.html"),
        "meeting": meeting,
        "people": [
            {"endpoint": fleet["a"].url, "token": token([meeting + "*"], actions=rights, sub="ada"), "name": "Ada"},
            {"endpoint": fleet["b"].url, "token": token([meeting + "*"], actions=rights, sub="grace"), "name": "Grace"},
        ],
        "timeoutMs": 30000,
    }
    positions = tmp_path / "meeting.positions"
    outs = [tmp_path / "service-1.out", tmp_path / "service-2.out"]
    service = run_meeting_service(fleet["cloud"].url, positions, outs[0])
    browser = subprocess.Popen([node, str(REPO / "tests" / "browser" / "meeting.mjs"), json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert browser.stdin is not None and browser.stdout is not None

    def step(**s: object) -> dict:
        browser.stdin.write(json.dumps(s) + "\n")
        browser.stdin.flush()
        r = json.loads(browser.stdout.readline())
        assert r["ok"], (s, r, [o.read_text() for o in outs if o.exists()])
        return r

    try:
        wait_for("the service", lambda: "listening" in outs[0].read_text())
        assert json.loads(browser.stdout.readline()).get("ready"), "the pages did not connect"
        step(wait="members")
        step(send=0, command="pause")
        r = step(until={"status": "paused", "by": "ada"})
        assert r["texts"] == ["paused (by ada)"] * 2
        commands = f"{meeting}/commands"
        wait_for("the saved position", lambda: positions.exists() and commands in json.loads(positions.read_text()))
        service.kill()  # SIGKILL
        service.wait()
        step(send=1, command="configure", data={"record": True})
        service = run_meeting_service(fleet["cloud"].url, positions, outs[1])
        step(until={"record": True, "by": "grace"})
        step(send=0, command="stop", sentAtLeast=2)
        step(until={"status": "ended", "by": "ada"})
        browser.stdin.close()  # the driver closes the browser and exits
        assert browser.wait(30) == 0
    finally:
        for p in (browser, service):
            if p.poll() is None:
                p.kill()
    first, second = (o.read_text() for o in outs)
    assert "from the saved positions" in second, second
    acted = (first + second).splitlines()
    for line in (f"{meeting} pause by ada -> paused", f"{meeting} configure by grace -> {{'record': True}}", f"{meeting} stop by ada -> ended"):
        assert acted.count(line) == 1, (line, first, second)


JOBS = REPO / "examples" / "job-events"


def test_job_events_reach_their_project_page_in_order_across_an_edge_kill(fleet: Fleet, tmp_path: Path):
    """examples/job-events: a FastAPI service (uvicorn) runs a job for each of two
    projects; project A's page reads from edge a, which is killed mid-job and restarted;
    the page ends with every step of its job, in order, none twice, nothing of B's."""
    import json
    import random
    import shutil
    import socket

    import httpx
    import pytest

    from .conftest import SECRET

    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if node is None or not Path(chromium).exists() or not (REPO / "tests" / "browser" / "node_modules" / "playwright-core").exists():
        pytest.skip("needs node, Chromium and tests/browser/node_modules (scripts/test installs them)")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OUTPOST_ENDPOINTS": f"{fleet['b'].url},{fleet['cloud'].url}",
        "OUTPOST_API_KEY": API_KEY,
        "OUTPOST_JWT_SECRET": SECRET,
        "OUTPOST_PAGE_ENDPOINT": fleet["a"].url,
        "JOB_STEP_SECONDS": "0.15",
    }
    env.pop("OUTPOST_TOKEN", None)
    service = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(JOBS), "app:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(tmp_path / "service.out", "w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    browser = None
    try:
        deadline = time.monotonic() + 30
        while True:
            assert service.poll() is None, (tmp_path / "service.out").read_text()
            try:
                if httpx.get(base + "/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "service.out").read_text()
            time.sleep(0.1)
        mine, other = f"p{random.randrange(10**8)}", f"q{random.randrange(10**8)}"
        sys.path.insert(0, str(JOBS))
        try:
            import app as jobs_app  # the example's own list of steps
        finally:
            sys.path.remove(str(JOBS))
        expect = [e for e, _ in jobs_app.steps("x")]
        cfg = {"url": f"{base}/?project={mine}", "expect": len(expect), "timeoutMs": 60000}
        browser = subprocess.Popen([node, str(REPO / "tests" / "browser" / "jobs.mjs"), json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
        assert browser.stdout is not None
        assert json.loads(browser.stdout.readline()).get("ready"), "the page did not subscribe"
        job = httpx.post(f"{base}/projects/{mine}/jobs").json()["job"]
        httpx.post(f"{base}/projects/{other}/jobs").raise_for_status()
        time.sleep(0.8)  # part of the job has been shown
        fleet["a"].kill()
        time.sleep(0.5)
        fleet["a"].start()
        fleet["a"].wait_ready()
        out = json.loads(browser.stdout.readline())
        assert browser.wait(30) == 0
        assert out["ok"], (out, (tmp_path / "service.out").read_text())
        events = out["events"]
        assert [e["event"] for e in events] == expect, [e["event"] for e in events]
        assert {e["data"]["job"] for e in events} == {job}, "another project's events reached the page"
        assert len({e["dot"] for e in events}) == len(events) == out["rows"], "an event shown twice"
        assert out["opens"] >= 2, f"the page never lost its edge: {out}"
    finally:
        for p in (browser, service):
            if p is not None and p.poll() is None:
                p.kill()
        fleet.wait_linked("a")
