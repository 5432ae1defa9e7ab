"""What the client hands you: plain dataclasses built from the protocol's JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class Op:
    """A durable op of a channel: an event, or a state write (``set``/``delete``).

    ``dot`` identifies it across the fleet (``"<origin>:<seq>"``); ``token`` is the
    subscriber's resume token after it.
    """

    channel: str
    dot: str
    hlc: str
    token: str
    kind: str  # "event" | "set" | "delete"
    event: Optional[str] = None
    data: Any = None
    key: Optional[str] = None
    value: Any = None
    #: Who published an event: the authenticated subject (a JWT's ``sub``, or
    #: ``apikey:<name>``), recorded by the endpoint that took the write — a client
    #: cannot set it. ``None`` for state writes and events stored before it existed.
    by: Optional[str] = None

    @classmethod
    def from_json(cls, m: Dict[str, Any]) -> "Op":
        return cls(
            channel=m["channel"],
            dot=m["dot"],
            hlc=m.get("hlc", ""),
            token=m.get("token", ""),
            kind=m.get("op", "event"),
            event=m.get("event"),
            data=m.get("data"),
            key=m.get("key"),
            value=m.get("value"),
            by=m.get("by"),
        )


@dataclass(frozen=True)
class Truncated:
    """Ops between your previous position and ``token`` will not arrive one by one
    (history was compacted, or the endpoint re-synced the channel from a snapshot):
    re-read state (``AsyncClient.state``); later ops arrive as usual."""

    channel: str
    token: str


@dataclass(frozen=True)
class Ephemeral:
    """A message fanned out to current subscribers only (never stored, no dot)."""

    channel: str
    event: str
    data: Any
    sender: Optional[str]


@dataclass(frozen=True)
class Member:
    client: str
    subject: str
    data: Any = None


@dataclass(frozen=True)
class PresenceChange:
    """Someone joined, updated their data in, or left a channel's presence."""

    channel: str
    action: str  # "join" | "update" | "leave"
    member: Member


@dataclass(frozen=True)
class Ack:
    """A durable write was stored: its dot (``None`` for an ephemeral publish)."""

    dot: Optional[str]
    duplicate: bool = False


@dataclass(frozen=True)
class Sibling:
    dot: str
    hlc: str
    value: Any


@dataclass(frozen=True)
class State:
    """A state key as read: the winning value, whether concurrent values exist, and the
    context to send with your next write to it."""

    channel: str
    key: str
    value: Any
    deleted: bool
    conflict: bool
    context: str
    siblings: Optional[List[Sibling]] = None

    @classmethod
    def from_json(cls, m: Dict[str, Any], channel: Optional[str] = None) -> "State":
        sib = m.get("siblings")
        return cls(
            channel=m.get("channel", channel or ""),
            key=m["key"],
            value=m.get("value"),
            deleted=bool(m.get("deleted", False)),
            conflict=bool(m.get("conflict", False)),
            context=m.get("context", ""),
            siblings=None
            if sib is None
            else [Sibling(dot=s["dot"], hlc=s.get("hlc", ""), value=s.get("value")) for s in sib],
        )


@dataclass(frozen=True)
class HistoryPage:
    """Durable ops after ``since``: page on with ``since=page.token`` while ``more``."""

    channel: str
    ops: List[Op]
    token: str
    more: bool
    truncated: bool


@dataclass
class Status:
    """The connection as the client sees it.

    ``state`` is ``connecting``, ``online``, ``offline`` or ``closed``; ``uplink`` is
    whether the endpoint syncs with the rest of the fleet now (``connected``,
    ``disconnected`` — an edge without its cloud: writes are kept and cross later —
    or ``none`` for the cloud itself).
    """

    state: str = "connecting"
    endpoint: Optional[str] = None
    client: Optional[str] = None
    replica: Optional[str] = None
    uplink: Optional[str] = None
    attempt: int = 0
    error: Optional[str] = None
    queued: int = 0
