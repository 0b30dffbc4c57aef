"""Domain errors: one mapping to the contract's HTTP status, and the legacy spelling."""

from __future__ import annotations

import pytest

from node.errors import (
    LEGACY_CODES,
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    Unauthenticated,
    legacy_fields,
)
from node.web.errors import from_domain


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Invalid("invalid_slug", "x"), 422),
        (Unauthenticated("invalid_credentials", "x"), 401),
        (Forbidden("forbidden", "x"), 403),
        (NotFound("room_not_found", "x"), 404),
        (Conflict("room_full", "x"), 409),
        (RateLimited("rate_limited", "x", retry_after_s=7), 429),
    ],
)
def test_each_kind_has_its_status(error: DomainError, status: int) -> None:
    mapped = from_domain(error)
    assert (mapped.status, mapped.code, mapped.message) == (status, error.code, "x")
    if error.retry_after_s is None:
        assert "Retry-After" not in mapped.headers
    else:
        assert mapped.headers["Retry-After"] == "7"


def test_the_legacy_spelling_is_the_hyphenated_one() -> None:
    assert legacy_fields("room_full") == {"legacy_code": "room-full"}
    assert legacy_fields("room_exists") == {}  # always snake_case over HTTP: nothing to keep
    assert all("-" not in code and "_" in code for code in LEGACY_CODES)
