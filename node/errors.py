"""What went wrong in the node's domain, said without HTTP or WebSocket.

State (Redis) and store (documents) refuse things a client asked for: a full room, an unknown
slug, a taken username. They raise these; `node/web/errors.py` maps them to the contract's
HTTP error (status from the kind, `{"error": {"code", "message"}}`) and `node/web/ws.py` to a
WebSocket `error` message, so the domain layers never import the web layer.

Codes have one spelling, snake_case (the HTTP API's and the contract's `busy`/`unavailable`).
The WebSocket spelled some with hyphens before; for one release every error whose code had one
also carries it as `legacy_code` (see `LEGACY_CODES`), then that field goes.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refusal with a stable code; the subclass says what kind, the web layer the status."""

    def __init__(self, code: str, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class Invalid(DomainError):
    """The input is well-formed but not acceptable (HTTP 422)."""


class Unauthenticated(DomainError):
    """Who is asking is not established (HTTP 401)."""


class Forbidden(DomainError):
    """Known caller, not allowed (HTTP 403)."""


class NotFound(DomainError):
    """No such thing (HTTP 404)."""


class Conflict(DomainError):
    """The current state refuses it: taken, full, already there (HTTP 409)."""


class TooLarge(DomainError):
    """Over a size limit or a quota (HTTP 413)."""


class Unsupported(DomainError):
    """A kind of content the node does not take (HTTP 415)."""


class RateLimited(DomainError):
    """Too often; `retry_after_s` says when to try again (HTTP 429)."""


class Unavailable(DomainError):
    """Live state is away for a moment; not the client's fault (HTTP 503, retry soon)."""


# The codes the WebSocket spelled with hyphens before the one spelling; gone next release.
_HYPHENATED_BEFORE = frozenset(
    {
        "already_joined",
        "bad_candidate",
        "bad_frame",
        "bad_sdp",
        "bad_token",
        "frame_too_large",
        "idle_timeout",
        "invalid_text",
        "no_connection",
        "no_offer",
        "not_admitted",
        "not_connected",
        "not_in_room",
        "rate_limited",
        "room_full",
        "room_not_found",
        "unknown_type",
        "wrong_token",
    }
)
LEGACY_CODES = {code: code.replace("_", "-") for code in _HYPHENATED_BEFORE}


def legacy_fields(code: str) -> dict[str, str]:
    """`{"legacy_code": ...}` for a code that had a hyphenated spelling, else nothing."""
    legacy = LEGACY_CODES.get(code)
    return {"legacy_code": legacy} if legacy else {}
