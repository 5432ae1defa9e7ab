"""Namespace subscriptions (`subscribe_pattern`), driven with raw WebSocket frames from
the `websockets` package as docs/PROTOCOL.md describes them: a service on the cloud
receives the commands users send to every matching channel, on any edge, channels
created later included, and resumes per channel after a disconnect."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Dict, List, Optional

import pytest
import websockets

import outpost

from .conftest import API_KEY, Fleet, token


def ws_url(http: str) -> str:
    return http.replace("http://", "ws://") + "/v1/ws"


async def recv_until(ws: Any, done: Any, timeout: float = 20.0) -> List[Dict[str, Any]]:
    """Messages until `done(messages)` holds (fails after `timeout` seconds)."""
    got: List[Dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {got[-8:]}"
        got.append(json.loads(await asyncio.wait_for(ws.recv(), left)))
    return got


def ops_of(msgs: List[Dict[str, Any]]) -> List[tuple]:
    return [(m["channel"], m["event"], m["data"], m.get("by")) for m in msgs if m["type"] == "op"]


async def connect(url: str, **headers: str) -> Any:
    ws = await websockets.connect(url, additional_headers=headers)
    hello = json.loads(await ws.recv())
    assert hello["type"] == "connected", hello
    return ws


async def test_a_service_receives_every_matching_channel_and_resumes_per_channel(fleet: Fleet) -> None:
    u = f"m{time.monotonic_ns() % 10**9}"
    pattern = f"meeting:{u}-*/commands"
    one, two, three = (f"meeting:{u}-{i}/commands" for i in (1, 2, 3))
    ada = token([f"meeting:{u}-*"], sub="ada")
    # A channel that exists before the service subscribes (written on edge a).
    outpost.publish(fleet["a"].url, one, "pause", {"n": 1}, token=ada)
    cloud = ws_url(fleet["cloud"].url)
    # Wait until the cloud holds it, so that it is replayed at subscribe.
    deadline = time.monotonic() + 20
    async with outpost.AsyncClient([fleet["cloud"].url], api_key=API_KEY) as c:
        while not (await c.history(one)).ops:
            assert time.monotonic() < deadline, "the op never reached the cloud"
            await asyncio.sleep(0.05)

    ws = await connect(cloud, **{"X-Api-Key": API_KEY})
    await ws.send(json.dumps({"type": "subscribe_pattern", "id": 1, "pattern": pattern}))
    msgs = await recv_until(ws, lambda g: g and g[-1]["type"] == "subscribed_pattern")
    assert msgs[-1] == {"type": "subscribed_pattern", "id": 1, "pattern": pattern, "channels": 1}
    assert ops_of(msgs) == [(one, "pause", {"n": 1}, "ada")]
    sub = [m for m in msgs if m["type"] == "subscribed"]
    assert [(m["channel"], m["replayed"], m["id"]) for m in sub] == [(one, 1, None)]
    tokens = {one: sub[0]["token"]}

    # A channel created later, on the other edge, by another user; a channel in the
    # same meeting that the pattern does not match.
    outpost.publish(fleet["b"].url, f"meeting:{u}-2/chat", "hello", None, token=ada)
    outpost.publish(fleet["b"].url, two, "stop", {"n": 2}, token=token([two], sub="grace"))
    msgs = await recv_until(ws, lambda g: any(m["type"] == "op" for m in g))
    assert [m["type"] for m in msgs] == ["subscribed", "op"], msgs
    assert (msgs[0]["channel"], msgs[0]["replayed"]) == (two, 0)
    assert ops_of(msgs) == [(two, "stop", {"n": 2}, "grace")]
    tokens[two] = msgs[1]["token"]
    await ws.close()

    # Away: more on a known channel, a new channel, nothing on the other.
    outpost.publish(fleet["a"].url, one, "resume", {"n": 3}, token=ada)
    outpost.publish(fleet["b"].url, three, "configure", {"n": 4}, token=ada)
    outpost.publish(fleet["a"].url, three, "stop", {"n": 5}, token=ada)
    # Back, with its tokens: the missed ops of each channel once, in order.
    ws = await connect(cloud, **{"X-Api-Key": API_KEY})
    await ws.send(json.dumps({"type": "subscribe_pattern", "id": 2, "pattern": pattern, "since": tokens}))

    def all_in(g: List[Dict[str, Any]]) -> bool:
        return len(ops_of(g)) >= 3 and any(m["type"] == "subscribed_pattern" for m in g)

    msgs = await recv_until(ws, all_in)
    got = ops_of(msgs)
    assert [o for o in got if o[0] == one] == [(one, "resume", {"n": 3}, "ada")]
    assert [o for o in got if o[0] == two] == []
    assert [o[1] for o in got if o[0] == three] in (["configure", "stop"], ["stop", "configure"])
    assert len(got) == 3, got
    # Nothing else arrives (no duplicates, not the chat channel).
    try:
        extra = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
        assert extra["type"] != "op", extra
    except asyncio.TimeoutError:
        pass
    # Unsubscribing ends every channel of it: a new op is not delivered.
    await ws.send(json.dumps({"type": "unsubscribe_pattern", "id": 3, "pattern": pattern}))
    msgs = await recv_until(ws, lambda g: any(m.get("id") == 3 for m in g))
    assert msgs[-1] == {"type": "unsubscribed_pattern", "id": 3, "pattern": pattern}
    outpost.publish(fleet["a"].url, one, "late", None, token=ada)
    try:
        extra = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
        assert extra["type"] != "op", extra
    except asyncio.TimeoutError:
        pass
    await ws.close()


async def refused(url: str, msg: Dict[str, Any], **headers: str) -> Optional[Dict[str, Any]]:
    ws = await connect(url, **headers)
    try:
        await ws.send(json.dumps(msg))
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return m
    finally:
        await ws.close()


async def test_namespace_subscriptions_say_clearly_where_and_to_whom_they_are_refused(fleet: Fleet) -> None:
    ask = {"type": "subscribe_pattern", "id": 9, "pattern": "meeting:*/commands"}
    # Edges hold only the channels in use there: the service must connect to the cloud.
    m = await refused(ws_url(fleet["a"].url), ask, **{"X-Api-Key": API_KEY})
    assert m and (m["type"], m["code"], m["id"]) == ("error", "bad_request", 9), m
    assert "cloud" in m["message"]
    # A grant that does not cover every channel the pattern matches.
    narrow = token(["meeting:42*"], actions=["subscribe"], sub="svc")
    m = await refused(ws_url(fleet["cloud"].url), ask, Authorization=f"Bearer {narrow}")
    assert m and (m["code"], m["id"]) == ("forbidden", 9), m
    # Not a pattern, and a token for a channel the pattern does not match.
    m = await refused(ws_url(fleet["cloud"].url), {**ask, "pattern": "meeting:1/commands"}, **{"X-Api-Key": API_KEY})
    assert m and m["code"] == "bad_request" and "'*'" in m["message"], m
    m = await refused(ws_url(fleet["cloud"].url), {**ask, "since": {"other:1": "x"}}, **{"X-Api-Key": API_KEY})
    assert m and m["code"] == "bad_request", m


async def test_the_sdk_receives_commands_across_channels_and_resumes_after_the_cloud_restarts(fleet: Fleet) -> None:
    """The Python SDK's `subscribe_pattern`: items carry their channel; the client
    resumes every channel from its position when the cloud comes back (kill -9)."""
    u = f"s{time.monotonic_ns() % 10**9}"
    ada = token([f"meeting:{u}-*"], sub="ada")
    async with outpost.AsyncClient([fleet["cloud"].url], api_key=API_KEY) as service:
        sub = await service.subscribe_pattern(f"meeting:{u}-*/commands")
        assert isinstance(sub, outpost.PatternSubscription) and sub.channels == 0
        outpost.publish(fleet["a"].url, f"meeting:{u}-1/commands", "pause", 1, token=ada)
        outpost.publish(fleet["b"].url, f"meeting:{u}-2/commands", "stop", 2, token=ada)
        outpost.publish(fleet["b"].url, f"meeting:{u}-2/notes", "no", 0, token=ada)
        got = [await sub.get(timeout=20) for _ in range(2)]
        assert sorted((o.channel, o.event, o.data, o.by) for o in got if isinstance(o, outpost.Op)) == [
            (f"meeting:{u}-1/commands", "pause", 1, "ada"),
            (f"meeting:{u}-2/commands", "stop", 2, "ada"),
        ]
        assert set(sub.tokens) == {f"meeting:{u}-1/commands", f"meeting:{u}-2/commands"}
        fleet.restart("cloud")
        for e in ("a", "b"):
            fleet.wait_linked(e)
        outpost.publish(fleet["a"].url, f"meeting:{u}-1/commands", "resume", 3, token=ada)
        outpost.publish(fleet["a"].url, f"meeting:{u}-3/commands", "configure", 4, token=ada)
        got = [await sub.get(timeout=30) for _ in range(2)]
        assert sorted((o.channel, o.data) for o in got if isinstance(o, outpost.Op)) == [
            (f"meeting:{u}-1/commands", 3),
            (f"meeting:{u}-3/commands", 4),
        ]
        with pytest.raises(asyncio.TimeoutError):
            await sub.get(timeout=1.0)  # nothing twice
        saved = dict(sub.tokens)
    # A new process resumes from the saved tokens: only what came after.
    outpost.publish(fleet["b"].url, f"meeting:{u}-2/commands", "end", 5, token=ada)
    async with outpost.AsyncClient([fleet["cloud"].url], api_key=API_KEY) as service:
        sub = await service.subscribe_pattern(f"meeting:{u}-*/commands", since=saved)
        assert sub.channels == 3
        item = await sub.get(timeout=20)
        assert isinstance(item, outpost.Op) and (item.channel, item.data) == (f"meeting:{u}-2/commands", 5)


def test_the_browser_sdk_follows_a_pattern_on_the_cloud(fleet: Fleet, tmp_path: Any) -> None:
    """clients/js (the browser SDK, run by node with its WebSocket): `pattern()`."""
    import shutil
    import subprocess

    from .conftest import REPO

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs node")
    u = f"j{time.monotonic_ns() % 10**9}"
    script = tmp_path / "follow.mjs"
    script.write_text(
        f"import {{ Outpost }} from '{REPO / 'clients' / 'js' / 'outpost.js'}';\n"
        "const [endpoint, token, pattern] = process.argv.slice(2);\n"
        "const c = new Outpost({ endpoints: [endpoint], token, transports: ['websocket'] });\n"
        "const p = c.pattern(pattern);\n"
        "p.on('op', (m) => console.log(JSON.stringify({ channel: m.channel, event: m.event, by: m.by })));\n"
        "p.on('subscribed', (r) => console.log(JSON.stringify({ started: r.channels })));\n"
        "p.on('error', (e) => console.log(JSON.stringify({ error: e.code })));\n"
        "await p.subscribe();\n"
    )
    ops_token = token([f"room:{u}-*"], actions=["subscribe"], sub="dashboard")
    proc = subprocess.Popen(
        [node, "--experimental-websocket", "--no-warnings", str(script), fleet["cloud"].url, ops_token, f"room:{u}-*/commands"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"started": 0}
        ada = token([f"room:{u}-*"], sub="ada")
        outpost.publish(fleet["a"].url, f"room:{u}-1/commands", "pause", None, token=ada)
        outpost.publish(fleet["b"].url, f"room:{u}-2/commands", "stop", None, token=ada)
        got = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert sorted((g["channel"], g["event"], g["by"]) for g in got) == [
            (f"room:{u}-1/commands", "pause", "ada"),
            (f"room:{u}-2/commands", "stop", "ada"),
        ]
    finally:
        proc.kill()


async def test_a_channel_subscribed_by_name_keeps_its_own_subscription(fleet: Fleet) -> None:
    u = f"n{time.monotonic_ns() % 10**9}"
    named, other = f"desk:{u}-1/commands", f"desk:{u}-2/commands"
    ada = token([f"desk:{u}-*"], sub="ada")
    outpost.publish(fleet["cloud"].url, named, "one", None, token=ada)
    outpost.publish(fleet["cloud"].url, other, "two", None, token=ada)
    ws = await connect(ws_url(fleet["cloud"].url), **{"X-Api-Key": API_KEY})
    try:
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": named}))
        msgs = await recv_until(ws, lambda g: any(m.get("id") == 1 for m in g))
        assert [m["data"] for m in msgs if m["type"] == "op"] == [None] and msgs[-1]["replayed"] == 1
        await ws.send(json.dumps({"type": "subscribe_pattern", "id": 2, "pattern": f"desk:{u}-*/commands"}))
        msgs = await recv_until(ws, lambda g: any(m.get("id") == 2 for m in g))
        # Only the other channel is the pattern's (and replayed); the named one is not again.
        assert msgs[-1]["channels"] == 1, msgs
        assert ops_of(msgs) == [(other, "two", None, "ada")]
        outpost.publish(fleet["cloud"].url, named, "three", None, token=ada)
        msgs = await recv_until(ws, lambda g: any(m["type"] == "op" for m in g))
        assert ops_of(msgs) == [(named, "three", None, "ada")]
        # Ending the pattern leaves the named subscription.
        await ws.send(json.dumps({"type": "unsubscribe_pattern", "id": 3, "pattern": f"desk:{u}-*/commands"}))
        await recv_until(ws, lambda g: any(m.get("id") == 3 for m in g))
        outpost.publish(fleet["cloud"].url, named, "four", None, token=ada)
        msgs = await recv_until(ws, lambda g: any(m["type"] == "op" for m in g))
        assert ops_of(msgs) == [(named, "four", None, "ada")]
        try:
            extra = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
            assert extra["type"] != "op", extra
        except asyncio.TimeoutError:
            pass
    finally:
        await ws.close()
