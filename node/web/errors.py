"""The contract's error shape, `{"error": {"code", "message"}}`, for every failure path."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from quart import Quart, Request, Response, jsonify
from quart_schema import RequestSchemaValidationError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from node.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
    Unsupported,
    legacy_fields,
)
from node.state.lock import LockError, LockUnavailable

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


# The one mapping from a domain refusal to its HTTP status.
_DOMAIN_STATUS: dict[type[DomainError], int] = {
    Invalid: 422,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Unsupported: 415,
    RateLimited: 429,
    Unavailable: 503,
}


def from_domain(error: DomainError) -> APIError:
    status = next((code for kind, code in _DOMAIN_STATUS.items() if isinstance(error, kind)), 400)
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return APIError(status, error.code, error.message, headers=headers)


def _malformed_json(why: str = "the body is not valid JSON") -> APIError:
    return APIError(400, "malformed_json", why)


class JSONCheckedRequest(Request):
    """A request whose unreadable JSON body is the contract's 400, whatever is wrong with it.

    Quart turns only ValueError from the parser into a 400 (a bare one, without saying
    why); bytes that are not UTF-8 and nesting past the parser's recursion limit escaped as
    500s.
    """

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        try:
            return await super().get_json(force=force, silent=silent, cache=cache)
        except UnicodeDecodeError as error:
            if silent:
                return None
            raise _malformed_json("the body is not UTF-8") from error
        except RecursionError as error:
            if silent:
                return None
            raise _malformed_json("the body is nested too deeply") from error

    def on_json_loading_failed(self, error: Exception) -> Any:
        raise _malformed_json() from error


def error_response(error: APIError) -> tuple[Response, int, dict[str, str]]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    body.update(legacy_fields(error.code))
    if error.details:
        body["details"] = error.details
    return jsonify({"error": body}), error.status, error.headers


def _validation_details(error: ValidationError) -> list[dict[str, Any]]:
    # Only where and what: pydantic's `input` would echo passwords back.
    return [
        {"field": ".".join(str(part) for part in item["loc"]) or "body", "problem": item["msg"]}
        for item in error.errors(include_url=False, include_input=False, include_context=False)
    ]


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def install_error_handlers(app: Quart) -> None:
    app.request_class = JSONCheckedRequest

    @app.errorhandler(APIError)
    async def _api_error(error: APIError) -> Any:
        return error_response(error)

    @app.errorhandler(DomainError)
    async def _domain_error(error: DomainError) -> Any:
        return error_response(from_domain(error))

    @app.errorhandler(RequestSchemaValidationError)
    async def _schema_error(error: RequestSchemaValidationError) -> Any:
        cause = error.validation_error
        if isinstance(cause, ValidationError):
            details = _validation_details(cause)
            summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5])
            return error_response(
                APIError(422, "invalid_input", summary or "invalid input", details=details)
            )
        return error_response(APIError(422, "invalid_input", "the request does not fit the schema"))

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Any:
        status = error.code or 500
        if status >= 500:
            log.error("http.error", extra={"status": status, "description": error.description})
            return error_response(APIError(status, "internal", "internal error"))
        message = error.description or error.name
        if status == 400 and "JSON" in str(message):
            return error_response(_malformed_json())
        # Allow (405), Retry-After (429, 503) and the like stay; the body is ours.
        headers = {
            name: value for name, value in error.get_headers() if name.lower() != "content-type"
        }
        return error_response(
            APIError(status, _HTTP_CODES.get(status, "error"), str(message), headers=headers)
        )

    @app.errorhandler(LockUnavailable)
    async def _room_busy(error: Exception) -> Any:
        log.warning("http.lock_busy", extra={"error": str(error)})
        return error_response(
            APIError(
                503,
                "busy",
                "the room is busy; try again in a moment",
                headers={"Retry-After": "1"},
            )
        )

    @app.errorhandler(RedisError)
    @app.errorhandler(LockError)
    async def _state_unavailable(error: Exception) -> Any:
        # Not the client's fault and not a crash: live state is away for a moment.
        log.warning("http.state_unavailable", extra={"error": str(error)})
        return error_response(
            APIError(
                503,
                "unavailable",
                "live state is unavailable; try again",
                headers={"Retry-After": "1"},
            )
        )

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Any:
        log.exception("http.unhandled", extra={"error_type": type(error).__name__})
        return error_response(APIError(500, "internal", "internal error"))
