"""Typed errors: one class per protocol error code (docs/PROTOCOL.md, "Error codes")."""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

import httpx


class OutpostError(Exception):
    """An error answered by an Outpost endpoint, or a failure of the client itself.

    ``code`` is the protocol's error code (``forbidden``, ``rate_limited`` ...) or one
    of the client's own (``timeout``, ``closed``); ``status`` is the HTTP status for
    REST answers.
    """

    code: str = "error"

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class BadRequest(OutpostError):
    code = "bad_request"


class Unauthorized(OutpostError):
    code = "unauthorized"


class TokenExpired(Unauthorized):
    code = "token_expired"


class Forbidden(OutpostError):
    code = "forbidden"


class BadChannel(OutpostError):
    code = "bad_channel"


class BadResumeToken(OutpostError):
    code = "bad_resume_token"


class MessageTooLarge(OutpostError):
    code = "message_too_large"


class TooManySubscriptions(OutpostError):
    code = "too_many_subscriptions"


class TooManyConnections(OutpostError):
    code = "too_many_connections"


class RateLimited(OutpostError):
    code = "rate_limited"


class NotFound(OutpostError):
    code = "not_found"


class BadState(OutpostError):
    code = "bad_state"


class Internal(OutpostError):
    code = "internal"


class StorageUnavailable(OutpostError):
    code = "storage_unavailable"


class Timeout(OutpostError):
    """No answer within the time allowed (the client's own code)."""

    code = "timeout"


class Closed(OutpostError):
    """The client was closed while the call waited."""

    code = "closed"


class Unavailable(OutpostError):
    """No endpoint could be reached (the client's own code)."""

    code = "unavailable"


_BY_CODE: Dict[str, Type[OutpostError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        TokenExpired,
        Forbidden,
        BadChannel,
        BadResumeToken,
        MessageTooLarge,
        TooManySubscriptions,
        TooManyConnections,
        RateLimited,
        NotFound,
        BadState,
        Internal,
        StorageUnavailable,
    )
}


def error_for(code: str, message: str, status: Optional[int] = None) -> OutpostError:
    """The typed error for a protocol error code (``OutpostError`` for unknown ones)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return OutpostError(message, code=code, status=status)
    return cls(message, status=status)


def check_answer(r: httpx.Response) -> Dict[str, Any]:
    """A REST answer's JSON body, or its typed error (``{"error": {code, message}}``)."""
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            code, message = err.get("code", "error"), err.get("message", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise OutpostError(f"HTTP {r.status_code}: {r.text[:200]}", status=r.status_code) from None
        raise error_for(code, message, r.status_code)
    body: Dict[str, Any] = r.json()
    return body
