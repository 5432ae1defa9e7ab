"""A small synchronous publish for scripts and workers (REST, no event loop needed)."""

from __future__ import annotations

import uuid
from typing import Any, List, Optional, Union

import httpx

from .client import _http_base, channel_path, credential_headers, one_credential
from .errors import Unavailable, check_answer
from .types import Ack


def publish(
    endpoints: Union[str, List[str]],
    channel: str,
    event: str,
    data: Any = None,
    *,
    token: Optional[str] = None,
    api_key: Optional[str] = None,
    key: Optional[str] = None,
    timeout: float = 10.0,
) -> Ack:
    """Publishes one durable event over REST and returns its ack once stored.

    ``endpoints``: one endpoint or several in order of preference; an endpoint that
    cannot be reached (or answers 503) is skipped for the next. The idempotency
    ``key`` (yours, or a random one) travels to every endpoint tried, so a retry after
    a lost answer does not store the event twice on the same endpoint.
    """
    one_credential(token, api_key)
    headers = credential_headers(token, api_key)
    body = {"event": event, "data": data, "key": key or f"py-{uuid.uuid4().hex}"}
    last: Optional[str] = None
    for endpoint in [endpoints] if isinstance(endpoints, str) else list(endpoints):
        url = f"{_http_base(endpoint)}/v1/channels/{channel_path(channel)}/events"
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=timeout)
        except httpx.TransportError as e:
            last = f"{endpoint}: {e}"
            continue
        if r.status_code == 503:
            last = f"{endpoint}: {r.text[:200]}"
            continue
        m = check_answer(r)
        return Ack(dot=m.get("dot"), duplicate=bool(m.get("duplicate", False)))
    raise Unavailable(f"no endpoint stored the event: {last}")
