"""The failover budget (issue 21, item 2), measured over repeated runs between real
processes: a subscriber on edge a with edge b as its second endpoint, a publisher on
the cloud publishing a numbered event every 5 ms.

- kill -9 of edge a: from the kill to the first event delivered through edge b.
- SIGSTOP of edge a (silently dead: the TCP connection stays open): from the moment
  the client noticed (its ping went unanswered) to the first event through edge b;
  and the noticing itself, which the ping bounds (interval + timeout).

Every run also checks that the subscriber saw every number once, in order. The
figures are printed (p50/p99/max) and, with FAILOVER_OUT=path, written as JSON.
FAILOVER_RUNS sets the number of runs (default 10 kills and 5 freezes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from typing import Dict, List

from outpost import AsyncClient, Op

from .conftest import API_KEY, Fleet

RUNS = int(os.environ.get("FAILOVER_RUNS", "10"))
PING_INTERVAL, PING_TIMEOUT = 0.5, 0.5


def summary(name: str, xs: List[float]) -> Dict[str, float]:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    s = {"runs": len(xs), "p50_ms": statistics.median(xs) * 1e3, "p99_ms": p99 * 1e3, "max_ms": xs[-1] * 1e3}
    print(f"{name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    return s


async def publisher(fleet: Fleet, channel: str, stop: asyncio.Event, counter: List[int]) -> None:
    async with AsyncClient([fleet["cloud"].url], api_key=API_KEY) as pub:
        while not stop.is_set():
            await pub.publish(channel, "tick", counter[0])
            counter[0] += 1
            await asyncio.sleep(0.005)


async def one_run(fleet: Fleet, channel: str, freeze: bool) -> "tuple[float, float]":
    """(seconds from the fault — or from noticing it — to the first delivery through
    edge b, seconds from the fault to noticing it)."""
    stop, counter = asyncio.Event(), [0]
    pub = asyncio.ensure_future(publisher(fleet, channel, stop, counter))
    a, b = fleet["a"].url, fleet["b"].url
    noticed: List[float] = []
    try:
        async with AsyncClient([a, b], api_key=API_KEY, ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT, backoff=(0.02, 0.5)) as c:
            c.on_status(lambda s: s.state == "offline" and not noticed and noticed.append(time.monotonic()))
            assert c.status.endpoint == a
            sub = await c.subscribe(channel)
            seen: List[int] = []
            # Steady state: live events flowing through edge a.
            while len(seen) < 20:
                item = await sub.get(timeout=10)
                assert isinstance(item, Op)
                seen.append(item.data)
            fault = time.monotonic()
            if freeze:
                fleet["a"].signal(signal.SIGSTOP)
            else:
                fleet["a"].kill()
            # Drain what edge a delivered before the fault; the first event after the
            # client moved is the one that counts.
            while True:
                item = await sub.get(timeout=15)
                assert isinstance(item, Op)
                seen.append(item.data)
                if c.status.endpoint == b and c.status.state == "online":
                    delivered = time.monotonic()
                    break
            # A few more, then the whole sequence must be there once, in order.
            for _ in range(10):
                item = await sub.get(timeout=10)
                assert isinstance(item, Op)
                seen.append(item.data)
            assert seen == list(range(seen[0], seen[0] + len(seen))), f"gap or duplicate across the failover: {seen}"
            when_noticed = noticed[0] if noticed else delivered
            start = when_noticed if freeze else fault
            return delivered - start, when_noticed - fault
    finally:
        stop.set()
        await pub
        if freeze:
            fleet["a"].signal(signal.SIGCONT)
            fleet["a"].kill()
        fleet["a"].start()
        fleet["a"].wait_ready()
        fleet.wait_linked("a")


async def test_failover_budget_over_repeated_runs(fleet: Fleet, channel: str):
    kills, freezes, notices = [], [], []
    for i in range(RUNS):
        took, _ = await one_run(fleet, f"{channel}-k{i}", freeze=False)
        kills.append(took)
    for i in range(max(3, RUNS // 2)):
        took, notice = await one_run(fleet, f"{channel}-s{i}", freeze=True)
        freezes.append(took)
        notices.append(notice)
    results = {
        "kill_9_to_delivery": summary("kill -9 → delivering through edge b", kills),
        "noticed_to_delivery": summary("SIGSTOP noticed → delivering through edge b", freezes),
        "sigstop_to_noticed": summary(f"SIGSTOP → noticed (ping {PING_INTERVAL} s + {PING_TIMEOUT} s)", notices),
    }
    if os.environ.get("FAILOVER_OUT"):
        with open(os.environ["FAILOVER_OUT"], "w") as f:
            json.dump(results, f, indent=2)
    # The targets are 100 ms (BENCHMARKS.md has the measured distributions: p99 26 ms
    # and 16 ms); the bounds are 5x that, so that a loaded CI machine does not make
    # this flaky.
    assert results["kill_9_to_delivery"]["p99_ms"] < 500
    assert results["noticed_to_delivery"]["p99_ms"] < 500
    assert results["sigstop_to_noticed"]["max_ms"] < (PING_INTERVAL + PING_TIMEOUT) * 1e3 + 1000
