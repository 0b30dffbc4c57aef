"""Bearer tokens on requests: which token, for which purpose, belonging to which user."""

from __future__ import annotations

from quart import request

from node.store.models import User
from node.store.users import get_user
from node.web.context import node_context
from node.web.errors import APIError
from node.web.tokens import Claims, Purpose, TokenError


def _unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def bearer_claims(purpose: Purpose) -> Claims:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized(f"a {purpose.value} token is required (Authorization: Bearer ...)")
    try:
        return node_context().tokens.verify(token.strip(), purpose)
    except TokenError as error:
        raise _unauthorized(str(error)) from error


async def user_of(claims: Claims) -> User:
    user = await get_user(claims.user_id)
    if user is None:
        raise _unauthorized("the token's user no longer exists")
    return user


async def authenticated_user(purpose: Purpose) -> tuple[Claims, User]:
    claims = bearer_claims(purpose)
    return claims, await user_of(claims)
