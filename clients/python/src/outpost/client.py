"""The asyncio client: one WebSocket to one endpoint at a time, failing over between
endpoints, resuming every subscription by token, resending unacknowledged writes.

Guarantees (the same as the browser SDK's):

- A durable publish carries an idempotency key (yours, or a random one); if the
  connection drops before its ack, it is sent again on the next connection, in the
  order the writes were made, so a write is stored once and acknowledged once.
- A subscription resumes from the token of the last op it handed you, on whichever
  endpoint the client reaches next; ops seen twice (a resume overlapping what you
  had) are dropped by dot. If history was compacted past your token you get a
  :class:`~outpost.types.Truncated` item instead of a silent gap.
- An endpoint that stops answering (power loss, a blackholed route) is noticed by a
  ping every ``ping_interval`` seconds answered within ``ping_timeout``; the client
  then moves to the next endpoint. An endpoint that closes with 4101 (draining,
  shutting down) is left for the next one at once.
- Memory is bounded: each subscription queues at most ``queue_size`` items; when you
  consume more slowly than ops arrive, the client stops reading, the server closes
  the connection as a slow consumer (4100), and the client resumes by token — nothing
  is lost, delivery is just paced by you.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import json
import logging
import random
import re
import uuid
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Set, TypeVar, Union
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from .errors import Closed, OutpostError, Timeout, Unauthorized, Unavailable, check_answer, error_for
from .types import (
    Ack,
    Ephemeral,
    HistoryPage,
    Member,
    Op,
    PresenceChange,
    State,
    Status,
    Truncated,
)

log = logging.getLogger("outpost")

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]
Item = Union[Op, Truncated, Ephemeral, PresenceChange]
_S = TypeVar("_S", bound="Subscription")

# Close codes (docs/PROTOCOL.md).
_GOING_AWAY = 4101
_UNAUTHORIZED = 4001
# Writes refused for a moment are sent again after this long.
_TRANSIENT = ("storage_unavailable", "rate_limited")
_TRANSIENT_RETRY_S = 0.5


class _Dropped(Exception):
    """The connection a request was sent on went away (internal: retried)."""


def _http_base(endpoint: str) -> str:
    """``http(s)://host:port`` for an endpoint given as http(s), ws(s) or host:port."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    u = urlsplit(endpoint)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    return urlunsplit((scheme, u.netloc, "", "", "")).rstrip("/")


def _ws_url(endpoint: str) -> str:
    u = urlsplit(_http_base(endpoint))
    return urlunsplit(("wss" if u.scheme == "https" else "ws", u.netloc, "/v1/ws", "", ""))


def one_credential(token: object, api_key: Optional[str]) -> None:
    if (token is None) == (api_key is None):
        raise ValueError("give exactly one of token= or api_key=")


def credential_headers(token: Optional[str], api_key: Optional[str]) -> Dict[str, str]:
    """The headers that carry a credential (never the URL)."""
    if api_key is not None:
        return {"X-Api-Key": api_key}
    return {"Authorization": f"Bearer {token}"}


def channel_path(channel: str) -> str:
    """A channel name in a REST path (every character but ``:@=`` encoded, slashes too)."""
    return quote(channel, safe=":@=")


class _DotWindow:
    """The last ``size`` dots seen: duplicates from an overlapping resume are dropped."""

    def __init__(self, size: int):
        self.size = size
        self.order: Deque[str] = collections.deque()
        self.seen: Set[str] = set()

    def add(self, dot: str) -> bool:
        if dot in self.seen:
            return False
        self.seen.add(dot)
        self.order.append(dot)
        if len(self.order) > self.size:
            self.seen.discard(self.order.popleft())
        return True


class _Write:
    __slots__ = ("msg", "future", "sent")

    def __init__(self, msg: Dict[str, Any], future: "asyncio.Future[Dict[str, Any]]"):
        self.msg = msg
        self.future = future
        self.sent = False


class Subscription:
    """A channel's ops, live, in order, resumed across reconnects: ``async for``.

    Yields :class:`Op` and :class:`Truncated` (and :class:`Ephemeral` /
    :class:`PresenceChange` when asked for at subscribe). ``token`` is your position
    (the token of the last item you took): keep it (a database, a file) and pass it as
    ``since`` to resume after a restart.
    """

    def __init__(self, client: "AsyncClient", channel: str, since: Optional[str], *, ephemeral: bool, presence: bool, queue_size: int, dedup_window: int):
        self.channel = channel
        self.token: Optional[str] = since or None
        # Where a resubscribe starts: the token of the last item queued for you.
        self._position: Optional[str] = since or None
        self._client = client
        self._ephemeral = ephemeral
        self._presence = presence
        # Items, then `None` once the subscription ended (if there was room for it).
        self._queue: "asyncio.Queue[Optional[Item]]" = asyncio.Queue(queue_size)
        self._dots = _DotWindow(dedup_window)
        # The connection generation this subscription is registered on.
        self._generation = 0
        self._ended = asyncio.Event()
        self._error: Optional[BaseException] = None
        self.replayed = 0

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Item:
        if self._queue.empty() and self._ended.is_set():
            return self._finish()
        item = await self._queue.get()
        if item is None:
            return self._finish()
        if isinstance(item, (Op, Truncated)):
            # Your position moves when you take the item, not when it arrives.
            self._took(item)
        return item

    def _took(self, item: Union[Op, Truncated]) -> None:
        self.token = item.token

    def _queued(self, item: Union[Op, Truncated]) -> None:
        self._position = item.token

    def _finish(self) -> Item:
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def get(self, timeout: Optional[float] = None) -> Item:
        """The next item (``asyncio.TimeoutError`` after ``timeout`` seconds)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def unsubscribe(self) -> None:
        """Stops the subscription; iteration ends after what is already queued."""
        await self._client._unsubscribe(self)

    @property
    def active(self) -> bool:
        return not self._ended.is_set()

    # -- fed by the client's reader --------------------------------------------------

    async def _deliver(self, m: Dict[str, Any]) -> None:
        kind = m.get("type")
        if kind == "op":
            if not self._dots.add(m.get("dot", "")):
                return
            await self._put(Op.from_json(m))
        elif kind == "subscribed" and m.get("id") is None and m.get("truncated"):
            await self._put(Truncated(self.channel, m.get("token", "")))
        elif kind == "ephemeral" and self._ephemeral:
            await self._put(Ephemeral(self.channel, m.get("event", ""), m.get("data"), m.get("from")))
        elif kind == "presence" and self._presence:
            member = Member(m.get("client", ""), m.get("subject", ""), m.get("data"))
            await self._put(PresenceChange(self.channel, m.get("action", ""), member))

    async def _put(self, item: Item) -> None:
        """Queues an item; waits while the queue is full (that pauses the connection's
        reader: the server sees a slow consumer and the client resumes later)."""
        if self._ended.is_set():
            return
        if not self._queue.full():
            self._queue.put_nowait(item)
        else:
            put = asyncio.ensure_future(self._queue.put(item))
            ended = asyncio.ensure_future(self._ended.wait())
            try:
                await asyncio.wait({put, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                if not put.done():
                    put.cancel()
            if not (put.done() and not put.cancelled()):
                return
        if isinstance(item, (Op, Truncated)):
            self._queued(item)

    def _end(self, error: Optional[BaseException] = None) -> None:
        self._error = error
        self._ended.set()
        try:
            self._queue.put_nowait(None)  # wakes a consumer waiting on an empty queue
        except asyncio.QueueFull:
            pass  # the consumer is behind: it finds the queue empty and ended later


class PatternSubscription(Subscription):
    """A namespace subscription: the ops of every channel ``pattern`` matches
    (``meeting:*/commands``; ``*`` is one or more characters other than ``/``),
    channels created later included: ``async for``. Served by the cloud and its
    coordinators (they hold every channel); an edge refuses it.

    Yields :class:`Op` and :class:`Truncated`, each with its ``channel``, in order per
    channel. ``tokens`` maps each channel to the token of the last item you took: keep
    it and pass it as ``since`` to resume after a restart (a channel missing from it
    is replayed from the start of its retained history).
    """

    def __init__(self, client: "AsyncClient", pattern: str, since: Optional[Dict[str, str]], *, queue_size: int, dedup_window: int):
        super().__init__(client, pattern, None, ephemeral=False, presence=False, queue_size=queue_size, dedup_window=dedup_window)
        self.pattern = pattern
        self.tokens: Dict[str, str] = dict(since or {})
        self._positions: Dict[str, str] = dict(since or {})
        self._regex = re.compile("".join("[^/]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))
        #: Channels that matched when the subscription last (re)started.
        self.channels = 0

    def matches(self, channel: str) -> bool:
        return self._regex.fullmatch(channel) is not None

    def _took(self, item: Union[Op, Truncated]) -> None:
        self.tokens[item.channel] = item.token

    def _queued(self, item: Union[Op, Truncated]) -> None:
        self._positions[item.channel] = item.token

    async def _deliver(self, m: Dict[str, Any]) -> None:
        kind, channel = m.get("type"), m.get("channel", "")
        if kind == "op":
            if self._dots.add(f"{channel} {m.get('dot', '')}"):
                await self._put(Op.from_json(m))
        elif kind == "subscribed" and m.get("truncated"):
            await self._put(Truncated(channel, m.get("token", "")))


class AsyncClient:
    """A service's connection to Outpost.

    ``endpoints``: edges and/or the cloud, in order of preference (``http://host:port``,
    ``https://…``, ``ws(s)://…`` or ``host:port``). Authenticate with ``token`` (a JWT,
    or a function — sync or async — returning a fresh one at each connect) or
    ``api_key`` (``opk_…``).

    Use as ``async with AsyncClient([...], api_key=...) as client:`` or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        endpoints: List[str],
        *,
        token: Optional[TokenSource] = None,
        api_key: Optional[str] = None,
        ping_interval: float = 5.0,
        ping_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        backoff: "tuple[float, float]" = (0.1, 5.0),
        queue_size: int = 10_000,
        dedup_window: int = 10_000,
    ):
        if not endpoints:
            raise ValueError("endpoints: give at least one")
        one_credential(token, api_key)
        self.endpoints = list(endpoints)
        self._token = token
        self._api_key = api_key
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff = backoff
        self.queue_size = queue_size
        self.dedup_window = dedup_window

        self.status = Status()
        self._listeners: List[Callable[[Status], None]] = []
        self._conn: Optional[ClientConnection] = None
        self._generation = 0
        self._online = asyncio.Event()
        self._closed = False
        self._next_id = 1
        self._pending: Dict[int, "asyncio.Future[Dict[str, Any]]"] = {}
        self._outbox: Deque[_Write] = collections.deque()
        self._send_lock = asyncio.Lock()
        self._flushing = False
        self._flush_again = False
        self._subs: Dict[str, Subscription] = {}
        self._endpoint_index = 0
        self._runner: Optional["asyncio.Task[None]"] = None
        self._http: Optional[httpx.AsyncClient] = None
        # The credential was refused in the last round (what wait_online raises).
        self._refused: Optional[Unauthorized] = None

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> "AsyncClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Starts connecting; with ``wait``, returns once online (or raises after
        ``timeout`` seconds, or at once for a credential that is refused)."""
        if self._runner is None:
            self._http = httpx.AsyncClient(timeout=self.request_timeout)
            self._runner = asyncio.get_running_loop().create_task(self._run())
        if wait:
            try:
                await self.wait_online(timeout)
            except BaseException:
                # `async with` does not exit what failed to enter: stop the loop here.
                await self.close()
                raise

    async def wait_online(self, timeout: Optional[float] = None) -> None:
        """Waits until connected (``Unauthorized`` at once if the credential is refused)."""

        async def until() -> None:
            while not self._online.is_set():
                if self._closed:
                    raise Closed("client closed")
                if self.status.state == "offline" and self._refused is not None:
                    raise self._refused
                # Every state change (online, offline, closed) goes through a status
                # change; `_online` is set in the same step as the "online" status.
                changed = asyncio.Event()
                remove = self.on_status(lambda _: changed.set(), now=False)
                try:
                    await changed.wait()
                finally:
                    remove()

        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"not connected within {timeout} s: {self.status.error or self.status.state}") from None

    async def close(self) -> None:
        """Closes the connection; pending calls raise :class:`Closed`, subscriptions end."""
        if self._closed:
            return
        self._closed = True
        self._online.clear()
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):
                pass
        if self._conn is not None:
            await self._conn.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Closed("client closed"))
        for w in self._outbox:
            if not w.future.done():
                w.future.set_exception(Closed("client closed before the write was acknowledged"))
        self._outbox.clear()
        for sub in list(self._subs.values()):
            sub._end()
        self._subs.clear()
        if self._http is not None:
            await self._http.aclose()
        self._set_status(state="closed")

    def on_status(self, fn: Callable[[Status], None], now: bool = True) -> Callable[[], None]:
        """Calls ``fn(status)`` on every change (and now); returns a function that stops it."""
        self._listeners.append(fn)
        if now:
            fn(self.status)

        def remove() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return remove

    # -- durable writes -------------------------------------------------------------------

    async def publish(self, channel: str, event: str, data: Any = None, *, key: Optional[str] = None, ephemeral: bool = False) -> Ack:
        """Publishes an event. Durable (the default): returns once stored, with its dot;
        queued while offline and sent again after a reconnect (``key`` makes repeats
        return the first dot; without one the client makes one up). ``ephemeral``: fanned
        out to current subscribers only, never stored, returns at once (``Ack(dot=None)``)."""
        msg: Dict[str, Any] = {"type": "publish", "channel": channel, "event": event, "data": data}
        if ephemeral:
            msg["ephemeral"] = True
            await self._send_when_online(msg)
            return Ack(dot=None)
        msg["key"] = key or f"py-{uuid.uuid4().hex}"
        reply = await self._write(msg)
        return Ack(dot=reply.get("dot"), duplicate=bool(reply.get("duplicate", False)))

    async def set(self, channel: str, key: str, value: Any, *, context: Optional[str] = None) -> Ack:
        """Writes a state key. Pass the ``context`` of your last read of it so that the
        values you saw are superseded; without one the write is *blind* (concurrent with
        whatever is there)."""
        msg: Dict[str, Any] = {"type": "set", "channel": channel, "key": key, "value": value}
        if context:
            msg["context"] = context
        reply = await self._write(msg)
        return Ack(dot=reply.get("dot"))

    async def delete(self, channel: str, key: str, *, context: Optional[str] = None) -> Ack:
        """Deletes a state key (``context`` as for :meth:`set`)."""
        msg: Dict[str, Any] = {"type": "delete", "channel": channel, "key": key}
        if context:
            msg["context"] = context
        reply = await self._write(msg)
        return Ack(dot=reply.get("dot"))

    # -- reads ------------------------------------------------------------------------------

    async def get(self, channel: str, key: str, *, siblings: bool = False) -> State:
        """Reads a state key: the winning value, ``conflict``, and the ``context`` for
        your next write (``siblings``: every concurrent value)."""
        m = await self._request({"type": "get", "channel": channel, "key": key, "siblings": siblings})
        return State.from_json(m, channel)

    async def state(self, channel: str) -> Dict[str, State]:
        """Every live key of a channel (REST, from the endpoint the client is on)."""
        body = await self._rest("GET", f"/v1/channels/{channel_path(channel)}/state")
        return {k["key"]: State.from_json(k, channel) for k in body.get("keys", [])}

    async def history(self, channel: str, *, since: Optional[str] = None, limit: int = 100) -> HistoryPage:
        """Durable ops after ``since`` (the start if none), at most ``limit`` (REST)."""
        params: Dict[str, Any] = {"limit": limit}
        if since:
            params["since"] = since
        body = await self._rest("GET", f"/v1/channels/{channel_path(channel)}/history", params=params)
        return HistoryPage(
            channel=body.get("channel", channel),
            ops=[Op.from_json({**o, "channel": o.get("channel", channel)}) for o in body.get("ops", [])],
            token=body.get("token", ""),
            more=bool(body.get("more", False)),
            truncated=bool(body.get("truncated", False)),
        )

    async def join(self, channel: str, data: Any = None) -> None:
        """Joins (or updates your data in) a channel's presence; you must be subscribed."""
        await self._request({"type": "presence", "channel": channel, "data": data})

    async def members(self, channel: str) -> List[Member]:
        """Who is present in a channel (on the endpoint the client is on)."""
        m = await self._request({"type": "members", "channel": channel})
        return [Member(x.get("client", ""), x.get("subject", ""), x.get("data")) for x in m.get("members", [])]

    async def ping(self) -> float:
        """Round trip to the current endpoint, in seconds."""
        loop = asyncio.get_running_loop()
        t = loop.time()
        await self._request({"type": "ping"})
        return loop.time() - t

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, channel: str, *, since: Optional[str] = None, ephemeral: bool = False, presence: bool = False) -> Subscription:
        """Subscribes to a channel: ops after ``since`` (a resume token; the whole
        retained history if none), then live ones. Returns once the replay is under way;
        iterate the subscription to get them. One subscription per channel per client."""
        if channel in self._subs:
            raise ValueError(f"already subscribed to {channel!r}")
        sub = Subscription(self, channel, since, ephemeral=ephemeral, presence=presence, queue_size=self.queue_size, dedup_window=self.dedup_window)
        return await self._start(sub)

    async def subscribe_pattern(self, pattern: str, *, since: Optional[Dict[str, str]] = None) -> PatternSubscription:
        """A namespace subscription (see :class:`PatternSubscription`): connect to the
        cloud or a coordinator. ``since``: the ``tokens`` of an earlier one."""
        if pattern in self._subs:
            raise ValueError(f"already subscribed to {pattern!r}")
        sub = PatternSubscription(self, pattern, since, queue_size=self.queue_size, dedup_window=self.dedup_window)
        return await self._start(sub)

    async def _start(self, sub: _S) -> _S:
        self._subs[sub.channel] = sub
        try:
            while True:
                await self._wait_online()
                if sub._generation == self._generation:
                    break  # the session registered it
                try:
                    await self._register(sub)
                    break
                except _Dropped:
                    continue
        except BaseException:
            self._subs.pop(sub.channel, None)
            sub._end()
            raise
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is not sub:
            return
        del self._subs[sub.channel]
        sub._end()
        if self._online.is_set():
            msg = {"type": "unsubscribe_pattern", "pattern": sub.channel} if isinstance(sub, PatternSubscription) else {"type": "unsubscribe", "channel": sub.channel}
            try:
                await self._request_once(msg)
            except (OutpostError, _Dropped):
                pass

    async def _register(self, sub: Subscription) -> None:
        """Subscribes on the current connection from the subscription's position: the
        token of the last item queued (what you have not taken yet is not asked again)."""
        generation = self._generation
        if isinstance(sub, PatternSubscription):
            pmsg: Dict[str, Any] = {"type": "subscribe_pattern", "pattern": sub.pattern}
            if sub._positions:
                pmsg["since"] = dict(sub._positions)
            reply = await self._request_once(pmsg)
            sub._generation = generation
            sub.channels = int(reply.get("channels", 0))
            return
        msg: Dict[str, Any] = {"type": "subscribe", "channel": sub.channel}
        if sub._position:
            msg["since"] = sub._position
        reply = await self._request_once(msg)
        sub._generation = generation
        sub.replayed = int(reply.get("replayed", 0))
        if reply.get("truncated"):
            await sub._put(Truncated(sub.channel, reply.get("token", "")))

    # -- the connection loop --------------------------------------------------------------------

    async def _credential(self) -> Dict[str, str]:
        source = self._token
        token: Optional[str] = None
        if callable(source):
            made = source()
            token = await made if inspect.isawaitable(made) else made
        else:
            token = source
        return credential_headers(token, self._api_key)

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            n = len(self.endpoints)
            last_error: Optional[str] = None
            connected = False
            for i in range(n):
                if self._closed:
                    return
                index = (self._endpoint_index + i) % n
                endpoint = self.endpoints[index]
                self._set_status(state="connecting", endpoint=endpoint, attempt=attempt)
                try:
                    conn, hello = await self._open(endpoint)
                except Unauthorized as e:
                    self._refused = e
                    last_error = f"{e.code}: {e.message}"
                    log.warning("outpost: %s refused the credential: %s", endpoint, e.message)
                    continue
                except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException, OutpostError) as e:
                    last_error = f"{endpoint}: {e or type(e).__name__}"
                    log.info("outpost: cannot connect to %s: %s", endpoint, last_error)
                    continue
                self._endpoint_index = index
                self._refused = None
                connected = True
                attempt = 0
                leave = await self._session(conn, hello, endpoint)
                if leave:
                    # Going away or silently dead: start with the next endpoint.
                    self._endpoint_index = (index + 1) % n
                break
            if self._closed:
                return
            if connected:
                continue
            attempt += 1
            self._set_status(state="offline", error=last_error or "no endpoint reachable", attempt=attempt)
            lo, hi = self.backoff
            await asyncio.sleep(random.uniform(0, min(hi, lo * 2 ** min(attempt, 16))))

    async def _open(self, endpoint: str) -> "tuple[ClientConnection, Dict[str, Any]]":
        headers = await self._credential()
        conn = await asyncio.wait_for(
            connect(
                _ws_url(endpoint),
                additional_headers=headers,
                open_timeout=self.connect_timeout,
                ping_interval=None,
                max_size=2**26,
                compression=None,
            ),
            self.connect_timeout,
        )
        try:
            raw = await asyncio.wait_for(conn.recv(), self.connect_timeout)
            hello = json.loads(raw)
            if hello.get("type") == "error":
                raise error_for(hello.get("code", "error"), hello.get("message", ""))
            if hello.get("type") != "connected":
                raise OutpostError(f"expected connected, got {hello.get('type')!r}", code="bad_request")
        except BaseException:
            await conn.close()
            raise
        return conn, hello

    async def _session(self, conn: ClientConnection, hello: Dict[str, Any], endpoint: str) -> bool:
        """Runs one connection until it ends; true if the next endpoint should be tried first."""
        self._conn = conn
        self._generation += 1
        generation = self._generation
        dead = False
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(conn))
        pinger = loop.create_task(self._ping(conn))
        setup = loop.create_task(self._setup(generation, endpoint, hello))
        try:
            await asyncio.wait({reader, pinger}, return_when=asyncio.FIRST_COMPLETED)
            dead = pinger.done() and not pinger.cancelled() and pinger.result() is True
        finally:
            self._online.clear()
            setup.cancel()
            pinger.cancel()
            reader.cancel()
            if dead:
                # Do not wait for a closing handshake a dead peer will never answer.
                conn.transport.abort()
            else:
                await conn.close()
            self._conn = None
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(_Dropped())
            self._pending.clear()
            for w in self._outbox:
                w.sent = False
        if not setup.cancelled() and setup.done() and setup.exception() is not None:
            log.error("outpost: setting up the connection failed: %r", setup.exception())
        code = conn.close_code
        reason = "did not answer a ping" if dead else (conn.close_reason or f"closed ({code})")
        if not self._closed:
            self._set_status(state="offline", error=f"{endpoint}: {reason}")
            log.info("outpost: connection to %s ended: %s", endpoint, reason)
        return dead or code == _GOING_AWAY

    async def _setup(self, generation: int, endpoint: str, hello: Dict[str, Any]) -> None:
        """On a new connection: every subscription again from its position, then the
        writes not yet acknowledged, in order; then the client is online."""
        while True:
            todo = [s for s in self._subs.values() if s.active and s._generation != generation]
            if not todo:
                break
            for sub in todo:
                try:
                    await self._register(sub)
                except _Dropped:
                    return  # the session ends; the next one starts over
                except OutpostError as e:
                    # Refused now (rights changed, channel limits): the iterator raises it.
                    self._subs.pop(sub.channel, None)
                    sub._end(e)
        await self._flush()
        self._set_status(state="online", endpoint=endpoint, client=hello.get("client"), replica=hello.get("replica"), uplink=hello.get("uplink"), error=None)
        self._online.set()

    async def _read(self, conn: ClientConnection) -> None:
        try:
            async for raw in conn:
                try:
                    m = json.loads(raw)
                except (TypeError, ValueError):
                    log.warning("outpost: undecodable message ignored")
                    continue
                await self._dispatch(m)
        except websockets.exceptions.ConnectionClosed:
            pass

    async def _dispatch(self, m: Dict[str, Any]) -> None:
        kind = m.get("type")
        mid = m.get("id")
        if mid is not None and kind != "op":
            fut = self._pending.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(m)
            return
        if kind == "uplink":
            self._set_status(uplink=m.get("state"))
            return
        if kind == "error":
            log.warning("outpost: %s: %s", m.get("code"), m.get("message"))
            return
        channel = m.get("channel", "")
        sub = self._subs.get(channel)
        if sub is None:
            # A namespace subscription's channel (subscriptions are keyed by channel or
            # by pattern; a channel name never holds '*').
            sub = next((p for p in self._subs.values() if isinstance(p, PatternSubscription) and p.active and p.matches(channel)), None)
        if sub is not None and sub.active:
            await sub._deliver(m)

    async def _ping(self, conn: ClientConnection) -> bool:
        """Pings until the endpoint fails to answer in time; returns True then."""
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await asyncio.wait_for(self._request_once({"type": "ping"}), self.ping_timeout)
            except asyncio.TimeoutError:
                log.warning("outpost: %s did not answer a ping within %s s", self.status.endpoint, self.ping_timeout)
                return True
            except _Dropped:
                return False

    # -- requests -------------------------------------------------------------------------------

    async def _wait_online(self) -> None:
        if self._closed:
            raise Closed("client closed")
        if self._runner is None:
            await self.start(wait=False)
        await self._online.wait()
        if self._closed:
            raise Closed("client closed")

    async def _send(self, msg: Dict[str, Any]) -> None:
        conn = self._conn
        if conn is None:
            raise _Dropped()
        try:
            async with self._send_lock:
                await conn.send(json.dumps(msg, separators=(",", ":")))
        except websockets.exceptions.ConnectionClosed:
            raise _Dropped() from None

    async def _send_when_online(self, msg: Dict[str, Any]) -> None:
        """Sends without waiting for an answer; a connection that drops under it is
        replaced and the message sent on the next (``Timeout`` after
        ``request_timeout``)."""

        async def attempt() -> None:
            while True:
                await self._wait_online()
                try:
                    return await self._send(msg)
                except _Dropped:
                    continue

        try:
            await asyncio.wait_for(attempt(), self.request_timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"{msg['type']}: not sent within {self.request_timeout} s") from None

    async def _request_once(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """Sends on the current connection and waits for the answer (``_Dropped`` if
        the connection goes first)."""
        if self._conn is None:
            raise _Dropped()
        mid = self._next_id
        self._next_id += 1
        fut: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            await self._send({**msg, "id": mid})
            reply = await fut
        finally:
            self._pending.pop(mid, None)
        if reply.get("type") == "error":
            raise error_for(reply.get("code", "error"), reply.get("message", ""))
        return reply

    async def _request(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """A read: sent again on the next connection if this one drops."""

        async def attempt() -> Dict[str, Any]:
            while True:
                await self._wait_online()
                try:
                    return await self._request_once(msg)
                except _Dropped:
                    continue

        try:
            return await asyncio.wait_for(attempt(), self.request_timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"{msg['type']}: no answer within {self.request_timeout} s") from None

    async def _write(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """A durable write: kept, in order, until acknowledged; sent again after drops."""
        fut: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
        w = _Write(msg, fut)
        self._outbox.append(w)
        self._set_status()
        if self._runner is None:
            await self.start(wait=False)
        if self._conn is not None:
            await self._flush()
        try:
            return await fut
        finally:
            if w in self._outbox:
                self._outbox.remove(w)
            self._set_status()

    async def _flush(self) -> None:
        """Sends every write not sent on this connection, in order (one flush at a
        time; a write queued meanwhile is picked up by the running one)."""
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            again = True
            while again:
                self._flush_again = False
                for w in list(self._outbox):
                    if w.sent or w.future.done():
                        continue
                    if self._conn is None:
                        return
                    w.sent = True
                    mid = self._next_id
                    self._next_id += 1
                    reply: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
                    self._pending[mid] = reply
                    reply.add_done_callback(functools.partial(self._acked, w))
                    try:
                        await self._send({**w.msg, "id": mid})
                    except _Dropped:
                        self._pending.pop(mid, None)
                        w.sent = False
                        return
                again = self._flush_again
        finally:
            self._flushing = False

    def _acked(self, w: _Write, reply: "asyncio.Future[Dict[str, Any]]") -> None:
        if w.future.done():
            return
        exc = None if reply.cancelled() else reply.exception()
        if reply.cancelled() or isinstance(exc, _Dropped):
            return  # the session marks every unacknowledged write unsent when it ends
        if exc is not None:
            w.future.set_exception(exc)
            return
        m = reply.result()
        if m.get("type") == "error":
            if m.get("code") in _TRANSIENT:
                w.sent = False
                asyncio.get_running_loop().call_later(_TRANSIENT_RETRY_S, lambda: asyncio.ensure_future(self._flush_if_online()))
                return
            w.future.set_exception(error_for(m.get("code", "error"), m.get("message", "")))
            return
        w.future.set_result(m)

    async def _flush_if_online(self) -> None:
        if self._conn is not None:
            await self._flush()

    async def _rest(self, method: str, path: str, **kw: Any) -> Dict[str, Any]:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.request_timeout)
        order = [self.status.endpoint] if self.status.endpoint else []
        order += [e for e in self.endpoints if e not in order]
        last: Optional[BaseException] = None
        for endpoint in order:
            try:
                r = await self._http.request(method, _http_base(endpoint) + path, headers=await self._credential(), **kw)
            except httpx.TransportError as e:
                last = e
                continue
            return check_answer(r)
        raise Unavailable(f"no endpoint answered: {last}")

    def _set_status(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.status, k, v)
        self.status.queued = len(self._outbox)
        for fn in list(self._listeners):
            try:
                fn(self.status)
            except Exception:  # a listener's bug must not stop the client
                log.exception("outpost: status listener failed")
