"""Bearer tokens on requests: which token, for which purpose, belonging to which user.

A signature alone is not enough: a token also stops working when its login was logged out
(its family is revoked in Redis) or its user changed password since it was issued (its
generation is older than the user's). Both are checked here, for every token that reaches
a user: one Redis GET and the user read every request already did.

`authenticated` puts the check in front of everything else a route does: a request without a
good token is answered 401 before its body or query string is read, parsed or validated
(validation normalises text, which costs the node time, and no one unknown may spend it).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quart import request
from quart_schema import security_scheme

from node.store.models import User
from node.store.users import get_user
from node.web.context import node_context
from node.web.errors import APIError
from node.web.tokens import Claims, Purpose, TokenError


def _unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(purpose: Purpose) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized(f"a {purpose.value} token is required (Authorization: Bearer ...)")
    return token.strip()


def bearer_claims(purpose: Purpose) -> Claims:
    """The signed claims of the request's token (not yet checked against revocation)."""
    token = bearer_token(purpose)
    try:
        return node_context().tokens.verify(token, purpose)
    except TokenError as error:
        raise _unauthorized(str(error)) from error


async def token_user(claims: Claims) -> User:
    """The user behind verified claims, if the token has not been revoked since."""
    context = node_context()
    if await context.token_state.family_revoked(claims.family):
        raise TokenError("token revoked (logged out)")
    user = await get_user(claims.user_id)
    if user is None:
        raise TokenError("the token's user no longer exists")
    if claims.generation != user.token_generation:
        raise TokenError("token revoked (password changed)")
    return user


async def authenticated_user(purpose: Purpose) -> tuple[Claims, User]:
    claims = bearer_claims(purpose)
    try:
        return claims, await token_user(claims)
    except TokenError as error:
        raise _unauthorized(str(error)) from error


@dataclass(frozen=True)
class Auth:
    """Who a request is from: its verified token and that token's user."""

    claims: Claims
    user: User


View = Callable[..., Awaitable[Any]]
#: on a view behind `authenticated`: the purpose its token must have
AUTH_ATTRIBUTE = "sfumesh_authenticated"


def authenticated(purpose: Purpose) -> Callable[[View], View]:
    """Only for holders of a `purpose` token; the view gets `auth` (an `Auth`).

    Put it right under the route decorator, above `validate_request` and
    `validate_querystring`: decorators run outside in, so the token is checked first and
    the body and query are never looked at for a caller who has none.
    """

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def checked(*args: Any, **kwargs: Any) -> Any:
            claims, user = await authenticated_user(purpose)
            return await view(*args, auth=Auth(claims, user), **kwargs)

        setattr(checked, AUTH_ATTRIBUTE, purpose)
        wrapped: View = security_scheme([{"bearer": []}])(checked)
        return wrapped

    return decorate
