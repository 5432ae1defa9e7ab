"""The Python SDK against real processes: a cloud and two edges (conftest.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import List

import httpx
import pytest

import outpost
from outpost import AsyncClient, Op, Truncated

from .conftest import API_KEY, LIMITED_KEY, Fleet, token


async def take_ops(sub: outpost.Subscription, n: int, timeout: float = 20.0) -> List[Op]:
    """The next `n` ops (other items fail the test)."""
    ops: List[Op] = []
    deadline = time.monotonic() + timeout
    while len(ops) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(ops)} of {n} ops in {timeout} s: {[o.data for o in ops][-5:]}")
        item = await sub.get(timeout=left)
        assert isinstance(item, Op), f"unexpected {item!r}"
        ops.append(item)
    return ops


async def test_a_service_publishes_on_one_edge_and_a_user_receives_on_the_other(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as service, AsyncClient([fleet["b"].url], token=token([channel])) as user:
        assert service.status.state == "online" and service.status.uplink == "connected"
        sub = await user.subscribe(channel)
        acks = [await service.publish(channel, "ingest.job.updated", {"job": 7, "n": i}) for i in range(20)]
        assert all(a.dot and not a.duplicate for a in acks)
        ops = await take_ops(sub, 20)
        assert [o.data["n"] for o in ops] == list(range(20))
        assert [o.dot for o in ops] == [a.dot for a in acks]
        assert all(o.event == "ingest.job.updated" and o.kind == "event" and o.channel == channel for o in ops)
        # The subscription's position is the token after the last op taken.
        assert sub.token == ops[-1].token


async def test_a_subscription_resumes_from_a_saved_token_after_a_restart(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as c:
        for i in range(10):
            await c.publish(channel, "e", i)
        sub = await c.subscribe(channel)
        first = await take_ops(sub, 4)
        saved = sub.token
        await sub.unsubscribe()
    # A new process, the token from its database: exactly what came after.
    async with AsyncClient([fleet["b"].url], api_key=API_KEY) as c:
        sub = await c.subscribe(channel, since=saved)
        rest = await take_ops(sub, 6)
        assert [o.data for o in first + rest] == list(range(10))
        with pytest.raises(asyncio.TimeoutError):
            await sub.get(timeout=0.5)


async def test_resume_after_the_edge_restarts_loses_and_repeats_nothing(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], api_key=API_KEY, backoff=(0.05, 0.5)) as sub_client, AsyncClient([fleet["b"].url], api_key=API_KEY) as pub:
        sub = await sub_client.subscribe(channel)
        for i in range(10):
            await pub.publish(channel, "e", i)
        got = await take_ops(sub, 10)
        fleet["a"].kill()
        # Published while the subscriber's edge is down: it must get them after.
        for i in range(10, 30):
            await pub.publish(channel, "e", i)
        fleet["a"].start()
        fleet["a"].wait_ready()
        fleet.wait_linked("a")
        got += await take_ops(sub, 20, timeout=30)
        assert [o.data for o in got] == list(range(30)), "gap, duplicate or reorder across the restart"
        assert len({o.dot for o in got}) == 30


async def test_failover_when_an_edge_is_killed(fleet: Fleet, channel: str):
    endpoints = [fleet["a"].url, fleet["b"].url]
    async with AsyncClient(endpoints, api_key=API_KEY, backoff=(0.05, 0.5)) as sub_client, AsyncClient([fleet["cloud"].url], api_key=API_KEY) as pub:
        assert sub_client.status.endpoint == fleet["a"].url
        sub = await sub_client.subscribe(channel)
        for i in range(5):
            await pub.publish(channel, "e", i)
        got = await take_ops(sub, 5)
        fleet["a"].kill()
        try:
            for i in range(5, 25):
                await pub.publish(channel, "e", i)
            got += await take_ops(sub, 20, timeout=30)
            assert sub_client.status.endpoint == fleet["b"].url
            assert [o.data for o in got] == list(range(25))
        finally:
            fleet["a"].start()
            fleet["a"].wait_ready()
            fleet.wait_linked("a")


async def test_an_edge_that_stops_answering_is_left_within_the_ping_bound(fleet: Fleet, channel: str):
    """SIGSTOP: the TCP connection stays open and silent, as after a power loss."""
    endpoints = [fleet["a"].url, fleet["b"].url]
    async with AsyncClient(endpoints, api_key=API_KEY, ping_interval=0.5, ping_timeout=0.5, backoff=(0.05, 0.5)) as c, AsyncClient([fleet["b"].url], api_key=API_KEY) as pub:
        sub = await c.subscribe(channel)
        moved = asyncio.get_running_loop().create_future()
        c.on_status(lambda s: s.state == "online" and s.endpoint == fleet["b"].url and not moved.done() and moved.set_result(time.monotonic()))
        fleet["a"].signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            at = await asyncio.wait_for(moved, 10)
            # interval + timeout = 1 s to notice; generous margin for the reconnect.
            assert at - stopped < 3.0, f"left the frozen edge after {at - stopped:.2f} s"
            await pub.publish(channel, "e", "after")
            (op,) = await take_ops(sub, 1)
            assert op.data == "after"
        finally:
            fleet["a"].signal(signal.SIGCONT)


async def test_writes_made_while_offline_are_sent_once_after_reconnect(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], api_key=API_KEY, backoff=(0.05, 0.3)) as c:
        await c.publish(channel, "e", "before")
        fleet["a"].kill()
        pending = [asyncio.ensure_future(c.publish(channel, "e", i)) for i in range(5)]
        await asyncio.sleep(0.5)
        assert not any(p.done() for p in pending) and c.status.queued == 5
        fleet["a"].start()
        fleet["a"].wait_ready()
        acks = await asyncio.wait_for(asyncio.gather(*pending), 30)
        assert len({a.dot for a in acks}) == 5
        page = await c.history(channel)
        assert [o.data for o in page.ops] == ["before", 0, 1, 2, 3, 4]
    fleet.wait_linked("a")


async def test_state_with_contexts_and_siblings(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as a, AsyncClient([fleet["b"].url], token=token([channel])) as b:
        # Both follow the channel: an edge receives other regions' ops for the channels
        # its clients subscribe to.
        await a.subscribe(channel)
        await b.subscribe(channel)
        empty = await a.get(channel, "title")
        assert empty.deleted and empty.value is None and not empty.conflict
        await a.set(channel, "title", "Q3", context=empty.context)
        read = await a.get(channel, "title")
        assert read.value == "Q3" and not read.conflict
        await a.set(channel, "title", "Q3 plan", context=read.context)
        # Two blind writes on two edges are concurrent: both kept as siblings.
        await a.set(channel, "owner", "ada")
        await b.set(channel, "owner", "grace")
        deadline = time.monotonic() + 20
        while True:
            s = await b.get(channel, "owner", siblings=True)
            if s.conflict and s.siblings and len(s.siblings) == 2:
                break
            assert time.monotonic() < deadline, f"no conflict seen: {s}"
            await asyncio.sleep(0.1)
        assert {x.value for x in s.siblings} == {"ada", "grace"}
        # A write with the context of that read supersedes both.
        await b.set(channel, "owner", "both", context=s.context)
        s2 = await b.get(channel, "owner")
        assert s2.value == "both" and not s2.conflict
        deadline = time.monotonic() + 20
        while (keys := await b.state(channel)).get("title") is None or keys["title"].value != "Q3 plan":
            assert time.monotonic() < deadline, f"edge b never had the title: {keys}"
            await asyncio.sleep(0.1)
        assert keys["owner"].value == "both"
        await a.delete(channel, "title", context=(await a.get(channel, "title")).context)
        assert (await a.get(channel, "title")).deleted


async def test_history_pages(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as c:
        for i in range(25):
            await c.publish(channel, "e", i)
        seen, since = [], None
        while True:
            page = await c.history(channel, since=since, limit=10)
            seen += [o.data for o in page.ops]
            since = page.token
            if not page.more:
                break
        assert seen == list(range(25))


async def test_presence_and_ephemeral(fleet: Fleet, channel: str):
    async with AsyncClient([fleet["a"].url], token=token([channel], sub="ada")) as ada, AsyncClient([fleet["a"].url], token=token([channel], sub="grace")) as grace:
        sub = await ada.subscribe(channel, ephemeral=True, presence=True)
        await grace.subscribe(channel)
        await grace.join(channel, {"name": "Grace"})
        item = await sub.get(timeout=10)
        assert isinstance(item, outpost.PresenceChange) and item.action == "join"
        assert item.member.subject == "grace" and item.member.data == {"name": "Grace"}
        members = await ada.members(channel)
        assert [m.subject for m in members] == ["grace"]
        ack = await grace.publish(channel, "cursor", {"x": 1}, ephemeral=True)
        assert ack.dot is None
        item = await sub.get(timeout=10)
        assert isinstance(item, outpost.Ephemeral) and item.event == "cursor" and item.data == {"x": 1}


async def test_errors_are_typed(fleet: Fleet, channel: str):
    url = fleet["a"].url
    with pytest.raises(outpost.Unauthorized):
        async with AsyncClient([url], token="not-a-jwt") as c:
            pass
    with pytest.raises(outpost.TokenExpired):
        async with AsyncClient([url], token=token(ttl=-60)) as c:
            pass
    async with AsyncClient([url], token=token(["project:mine"], actions=["subscribe"])) as c:
        with pytest.raises(outpost.Forbidden):
            await c.subscribe("project:theirs")
        with pytest.raises(outpost.Forbidden):
            await c.publish("project:mine", "e", 1)
        with pytest.raises(outpost.BadChannel):
            await c.subscribe("no spaces allowed")
        with pytest.raises(outpost.BadResumeToken):
            await c.subscribe("project:mine", since="!!not-a-token!!")
        with pytest.raises(outpost.Forbidden) as e:
            await c.history("project:theirs")
        assert e.value.status == 403
        # The connection is still usable after each refusal.
        assert await c.ping() < 5
    async with AsyncClient([url], api_key=API_KEY) as c:
        with pytest.raises(outpost.MessageTooLarge):
            await c.publish(channel, "big", "x" * 70_000)
        assert (await c.publish(channel, "small", 1)).dot


async def test_an_api_key_is_limited_to_its_rights(fleet: Fleet):
    async with AsyncClient([fleet["a"].url], api_key=LIMITED_KEY) as c:
        assert (await c.publish("project:1", "e", 1)).dot
        with pytest.raises(outpost.Forbidden):
            await c.publish("project:2", "e", 1)
        with pytest.raises(outpost.Forbidden):
            await c.set("project:1", "k", 1)
    with pytest.raises(outpost.Unauthorized):
        async with AsyncClient([fleet["a"].url], api_key="opk_unknown") as c:
            pass


async def test_a_token_function_is_asked_at_each_connect(fleet: Fleet, channel: str):
    calls = []

    def fresh() -> str:
        calls.append(1)
        return token([channel])

    async with AsyncClient([fleet["b"].url], token=fresh) as c:
        await c.publish(channel, "e", 1)
    assert len(calls) == 1


def test_sync_publish_skips_an_endpoint_that_is_down_and_is_idempotent(fleet: Fleet, channel: str):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    ack = outpost.publish([dead, fleet["a"].url], channel, "job.created", {"job": 1}, api_key=API_KEY, key="job-1-created")
    again = outpost.publish(fleet["a"].url, channel, "job.created", {"job": 1}, api_key=API_KEY, key="job-1-created")
    assert ack.dot and again.dot == ack.dot and again.duplicate
    with pytest.raises(outpost.Forbidden):
        outpost.publish(fleet["a"].url, "project:2", "e", 1, api_key=LIMITED_KEY)
    r = httpx.get(f"{fleet['a'].url}/v1/channels/{outpost.channel_path(channel)}/history", headers={"X-Api-Key": API_KEY})
    assert [o["data"] for o in r.json()["ops"]] == [{"job": 1}]


async def test_channels_with_slashes(fleet: Fleet, channel: str):
    sub_channel = channel + "/canvas"
    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as c:
        await c.publish(sub_channel, "draw", {"x": 1})
        page = await c.history(sub_channel)
        assert [o.data for o in page.ops] == [{"x": 1}]
        assert outpost.publish(fleet["b"].url, sub_channel, "draw", {"x": 2}, api_key=API_KEY).dot


async def test_a_slow_consumer_resumes_without_loss(fleet: Fleet, channel: str):
    """A queue of 5 items: the client stops reading, the edge closes it as a slow
    consumer, and it resumes by token — every op arrives once, in order."""
    async with AsyncClient([fleet["a"].url], api_key=API_KEY, queue_size=5, backoff=(0.05, 0.3)) as slow, AsyncClient([fleet["a"].url], api_key=API_KEY) as pub:
        sub = await slow.subscribe(channel)
        await asyncio.gather(*(pub.publish(channel, "e", i) for i in range(300)))
        got = await take_ops(sub, 300, timeout=60)
        assert sorted(o.data for o in got) == list(range(300))
        assert len({o.dot for o in got}) == 300
        tokens_seen = [o.dot for o in got]
        assert tokens_seen == [o.dot for o in (await pub.history(channel, limit=300)).ops]


async def test_compacted_history_is_reported_not_skipped_silently(fleet: Fleet):
    # Namespace `short` keeps 5 ops per channel (conftest.py). (An edge keeps its own
    # ops until the cloud acknowledged them; the cloud compacts at once.)
    channel = f"short:{time.monotonic_ns()}"
    async with AsyncClient([fleet["cloud"].url], api_key=API_KEY) as c:
        for i in range(20):
            await c.publish(channel, "e", i)
        # Compaction runs after the writes, not with them: wait until it did.
        deadline = time.monotonic() + 20
        while not (await c.history(channel)).truncated:
            assert time.monotonic() < deadline, "the cloud never compacted the channel"
            await asyncio.sleep(0.1)
        sub = await c.subscribe(channel)
        ops: List[Op] = []
        while not isinstance(item := await sub.get(timeout=5), Truncated):
            ops.append(item)
        # The retained tail (compaction keeps at least max_ops), then the notice.
        assert 5 <= len(ops) < 20
        assert [o.data for o in ops] == list(range(20 - len(ops), 20))
        assert item.channel == channel
        assert sub.token == item.token
        page = await c.history(channel)
        assert page.truncated and [o.data for o in page.ops] == [o.data for o in ops]


async def test_reads_on_an_edge_that_does_not_follow_the_channel_are_not_stale(fleet: Fleet, channel: str):
    """Nobody on edge b subscribes to the channel, so b is not synced with it live: a
    read there asks the cloud for what b lacks before answering. The guarantee: once
    the cloud holds a write (edge a's ack says a stored it; it reaches the cloud a
    moment later), any read on b shows it — asserted with one read, no polling on b."""
    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as a, AsyncClient([fleet["b"].url], api_key=API_KEY) as b, AsyncClient([fleet["cloud"].url], api_key=API_KEY) as cloud:

        async def at_the_cloud(ch: str, key: str, value: object) -> None:
            deadline = time.monotonic() + 20
            while (await cloud.get(ch, key)).value != value:
                assert time.monotonic() < deadline, f"the cloud never got {key}={value}"
                await asyncio.sleep(0.02)

        # b holds the channel already (it wrote to it): the old answer was b's own copy.
        await b.set(channel, "owner", "grace")
        for round_ in range(3):
            await a.publish(channel, "job.updated", {"round": round_})
            await a.set(channel, "title", f"v{round_}")
            await at_the_cloud(channel, "title", f"v{round_}")
            got = await b.get(channel, "title")  # WebSocket
            assert got.value == f"v{round_}", f"round {round_}: edge b answered {got}"
            keys = await b.state(channel)  # REST
            assert keys["title"].value == f"v{round_}" and keys["owner"].value == "grace"
            page = await b.history(channel)  # REST
            assert [o.data for o in page.ops if o.kind == "event"] == [{"round": r} for r in range(round_ + 1)]
        # A channel b has never held: the same.
        fresh_channel = channel + "-new"
        await a.set(fresh_channel, "k", 1)
        await at_the_cloud(fresh_channel, "k", 1)
        assert (await b.get(fresh_channel, "k")).value == 1
    assert fleet["b"].metric("outpost_read_fetches_total") > 0


async def test_resuming_on_an_edge_that_does_not_hold_the_channel_replays_before_subscribed(fleet: Fleet, channel: str):
    """PROTOCOL.md: replayed ops come before `subscribed`. Edge b has never held the
    channel: it catches up with the cloud before answering (raw WebSocket frames)."""
    import json

    import websockets

    async with AsyncClient([fleet["a"].url], api_key=API_KEY) as a:
        for i in range(10):
            await a.publish(channel, "e", i)
        sub = await a.subscribe(channel)
        await take_ops(sub, 4)
        saved = sub.token
    url = fleet["b"].url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers={"X-Api-Key": API_KEY}) as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": channel, "since": saved}))
        seen = []
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m["type"] == "op":
                seen.append(m["data"])
            elif m["type"] == "subscribed":
                break
        assert m["id"] == 1 and m["replayed"] == 6, m
        assert seen == list(range(4, 10)), "missed ops must be replayed before `subscribed`"
    # The SDK reports the same.
    async with AsyncClient([fleet["b"].url], api_key=API_KEY) as b:
        sub = await b.subscribe(channel + "-x")  # never written: nothing to replay
        assert sub.replayed == 0


async def test_a_service_receives_a_command_with_the_senders_identity(fleet: Fleet, channel: str):
    """A user's command (and every other op) carries who wrote it, as the edge
    authenticated them — a client cannot claim to be someone else (`by` is not a field
    it can send)."""
    commands = channel + "/commands"
    async with AsyncClient([fleet["b"].url], api_key=API_KEY) as service, AsyncClient([fleet["a"].url], token=token([commands], sub="ada")) as ada:
        sub = await service.subscribe(commands)
        await ada.publish(commands, "pause", {"reason": "lunch"})
        (op,) = await take_ops(sub, 1)
        assert (op.event, op.data, op.by) == ("pause", {"reason": "lunch"}, "ada")
        # A client that tries to set it is refused (not a field of publish).
        with pytest.raises(outpost.BadRequest):
            await ada._request({"type": "publish", "channel": commands, "event": "stop", "data": None, "by": "grace"})
        # REST publishes and API keys are stamped too.
        outpost.publish(fleet["a"].url, commands, "resume", None, token=token([commands], sub="grace"))
        await service.publish(commands, "ack", None)
        ops = await take_ops(sub, 2)  # from two edges: either may come first
        assert {(o.event, o.by) for o in ops} == {("resume", "grace"), ("ack", "apikey:service")}
        page = await service.history(commands)
        assert {o.event: o.by for o in page.ops} == {"pause": "ada", "resume": "grace", "ack": "apikey:service"}
        # State writes too.
        await ada.set(commands, "mode", "quiet")
        await ada.delete(commands, "mode")
        ops = await take_ops(sub, 2)
        assert [(o.kind, o.key, o.by) for o in ops] == [("set", "mode", "ada"), ("delete", "mode", "ada")]


async def test_an_sse_stream_ends_with_token_expired_when_its_token_expires(fleet: Fleet, channel: str):
    """A plain SSE client (httpx): the stream says `token_expired` and ends at the
    token's `exp`, instead of running on with a dead credential."""
    import json as _json

    short = token([channel], actions=["subscribe"], ttl=2)
    url = f"{fleet['a'].url}/v1/channels/{outpost.channel_path(channel)}/events?token={short}"
    events: List[str] = []
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream("GET", url, headers={"Accept": "text/event-stream"}) as r:
            assert r.status_code == 200
            data = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                elif line.startswith("data:") and events and events[-1] == "token_expired":
                    data = _json.loads(line.split(":", 1)[1])
    took = time.monotonic() - t0
    assert events[0] == "subscribed" and events[-1] == "token_expired", events
    assert data is not None and data["code"] == "token_expired", data
    assert 1.0 < took < 8.0, f"the stream ended after {took:.1f} s for a 2 s token"
    # Reconnecting with the same token is refused.
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.get(url, headers={"Accept": "text/event-stream"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
