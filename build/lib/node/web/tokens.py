"""Signed, expiring tokens with a fixed purpose (requirement U5).

login -> user token -> session token -> room token. Each carries `purpose`, and a token
presented for any other purpose is refused, as is an expired, tampered or unknown-key one.
Keys have ids (`kid`): every configured key verifies, only the signing key signs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt

from node.config import TokenSettings

ALGORITHM = "HS256"


class Purpose(StrEnum):
    USER = "user"
    SESSION = "session"
    ROOM = "room"


class TokenError(Exception):
    """The token cannot be accepted; the message is safe to show the client."""


@dataclass(frozen=True)
class Claims:
    purpose: Purpose
    user_id: str
    expires_at: datetime
    token_id: str
    session_id: str | None = None
    room: str | None = None
    node: str | None = None


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: datetime
    claims: Claims


class TokenService:
    def __init__(self, settings: TokenSettings) -> None:
        if not settings.keys:
            raise ValueError("no token keys configured (tokens.keys / SFUMESH_TOKEN_KEYS)")
        self._keys = {kid: key.get_secret_value() for kid, key in settings.keys.items()}
        self._kid = settings.signing_key_id
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._ttl = {
            Purpose.USER: settings.user_ttl_s,
            Purpose.SESSION: settings.session_ttl_s,
            Purpose.ROOM: settings.room_ttl_s,
        }

    def issue(
        self,
        purpose: Purpose,
        user_id: str,
        *,
        session_id: str | None = None,
        room: str | None = None,
        node: str | None = None,
        ttl_s: float | None = None,
        now: datetime | None = None,
    ) -> IssuedToken:
        if purpose is not Purpose.USER and session_id is None:
            raise ValueError(f"a {purpose} token needs a session id")
        if purpose is Purpose.ROOM and (room is None or node is None):
            raise ValueError("a room token needs a room and a node")
        issued = (now or datetime.now(UTC)).replace(microsecond=0)
        expires = issued + timedelta(seconds=self._ttl[purpose] if ttl_s is None else ttl_s)
        claims = Claims(purpose, user_id, expires, secrets.token_hex(12), session_id, room, node)
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": user_id,
            "purpose": purpose.value,
            "iat": issued,
            "exp": expires,
            "jti": claims.token_id,
        }
        for name in ("session_id", "room", "node"):
            if getattr(claims, name) is not None:
                payload[name] = getattr(claims, name)
        token = jwt.encode(payload, self._keys[self._kid], ALGORITHM, headers={"kid": self._kid})
        return IssuedToken(token, expires, claims)

    def verify(self, token: str, purpose: Purpose) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, UnicodeError) as error:
            raise TokenError("malformed token") from error
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise TokenError("token signed by an unknown key")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "purpose"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise TokenError("token expired") from error
        except jwt.PyJWTError as error:
            raise TokenError("invalid token") from error
        if payload.get("purpose") != purpose.value:
            raise TokenError(f"not a {purpose.value} token")
        context = [payload.get(name) for name in ("session_id", "room", "node")]
        if not all(isinstance(value, str | None) for value in (payload["sub"], *context)):
            raise TokenError("invalid token")
        try:
            expires_at = datetime.fromtimestamp(int(payload["exp"]), UTC)
        except (OverflowError, OSError, ValueError) as error:
            raise TokenError("invalid token") from error
        claims = Claims(purpose, payload["sub"], expires_at, str(payload["jti"]), *context)
        if purpose is not Purpose.USER and not claims.session_id:
            raise TokenError("token carries no session")
        return claims
