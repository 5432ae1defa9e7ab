"""Outpost for Python services: publish events, subscribe with resume and failover,
read and write state, presence and history — against edges and the cloud alike.

    import asyncio, outpost

    async def main():
        async with outpost.AsyncClient(["http://127.0.0.1:7701"], api_key="opk_...") as c:
            await c.publish("project:42", "ingest.job.created", {"job": 7})
            sub = await c.subscribe("project:42/commands")
            async for op in sub:
                print(op.event, op.data)

    asyncio.run(main())
"""

from .client import AsyncClient, PatternSubscription, Subscription, channel_path
from .errors import (
    BadChannel,
    BadRequest,
    BadResumeToken,
    BadState,
    Closed,
    Forbidden,
    Internal,
    MessageTooLarge,
    NotFound,
    OutpostError,
    RateLimited,
    StorageUnavailable,
    Timeout,
    TokenExpired,
    TooManyConnections,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
    error_for,
)
from .sync import publish
from .types import Ack, Ephemeral, HistoryPage, Member, Op, PresenceChange, Sibling, State, Status, Truncated

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Subscription",
    "PatternSubscription",
    "publish",
    "channel_path",
    "Ack",
    "Ephemeral",
    "HistoryPage",
    "Member",
    "Op",
    "PresenceChange",
    "Sibling",
    "State",
    "Status",
    "Truncated",
    "OutpostError",
    "BadChannel",
    "BadRequest",
    "BadResumeToken",
    "BadState",
    "Closed",
    "Forbidden",
    "Internal",
    "MessageTooLarge",
    "NotFound",
    "RateLimited",
    "StorageUnavailable",
    "Timeout",
    "TokenExpired",
    "TooManyConnections",
    "TooManySubscriptions",
    "Unauthorized",
    "Unavailable",
    "error_for",
]
