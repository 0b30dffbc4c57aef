"""Signed, expiring tokens with a fixed purpose (requirement U5).

login -> user token -> session token -> room token. Each carries `purpose`, and a token
presented for any other purpose is refused, as is an expired, tampered or unknown-key one.
Keys have ids (`kid`): every configured key verifies, only the signing key signs.

Revocation (checked by node/web/auth.py, not here: it needs the user and Redis):
- `fam`, the token family: one login, every user token refreshed from it and every session
  and room token bought with them. Logout revokes the family (node/state/revocation.py).
- `gen`, the user's token generation when issued: a password change raises the user's
  generation, so every older token of that user is refused at once, on every node.
- `auth_time`, when the family logged in: refresh stops after `tokens.user_max_age_s`.
"""

from __future__ import annotations

import json
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
    #: read one room's files from a URL (<img src>): node/web/files.py
    FILE = "file"
    #: a room's calendar feed, in its URL (calendar apps send no header); revoked by its own
    #: family (node/web/happenings.py), never by logout, so not in `longest_ttl_s`
    CALENDAR = "calendar"


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
    # Tokens from before families and generations had neither: such a token is its own
    # family (its jti) and of generation 0.
    family: str = ""
    generation: int = 0
    authenticated_at: datetime | None = None


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
            Purpose.FILE: settings.file_ttl_s,
        }
        #: no token lives longer than this (how long a logged-out family stays refused)
        self.longest_ttl_s = max(self._ttl.values())
        self._ttl[Purpose.CALENDAR] = settings.calendar_ttl_s
        self.user_max_age_s = settings.user_max_age_s

    def issue(
        self,
        purpose: Purpose,
        user_id: str,
        *,
        session_id: str | None = None,
        room: str | None = None,
        node: str | None = None,
        family: str | None = None,
        generation: int = 0,
        authenticated_at: datetime | None = None,
        ttl_s: float | None = None,
        now: datetime | None = None,
    ) -> IssuedToken:
        """A signed token. A user token without a `family` starts one (a login); session
        and room tokens pass on the family, generation and login time of the token that
        bought them."""
        if purpose not in (Purpose.USER, Purpose.CALENDAR) and session_id is None:
            raise ValueError(f"a {purpose} token needs a session id")
        if purpose is Purpose.ROOM and (room is None or node is None):
            raise ValueError("a room token needs a room and a node")
        if purpose is Purpose.FILE and room is None:
            raise ValueError("a file token needs a room")
        issued = (now or datetime.now(UTC)).replace(microsecond=0)
        expires = issued + timedelta(seconds=self._ttl[purpose] if ttl_s is None else ttl_s)
        token_id = secrets.token_hex(12)
        logged_in = (authenticated_at or issued).replace(microsecond=0)
        claims = Claims(
            purpose,
            user_id,
            expires,
            token_id,
            session_id,
            room,
            node,
            family=family or secrets.token_hex(12),
            generation=generation,
            authenticated_at=logged_in,
        )
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": user_id,
            "purpose": purpose.value,
            "iat": issued,
            "exp": expires,
            "jti": claims.token_id,
            "fam": claims.family,
            "gen": claims.generation,
            "auth_time": int(logged_in.timestamp()),
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
        family = payload.get("fam", str(payload["jti"]))
        generation = payload.get("gen", 0)
        auth_time = payload.get("auth_time")
        number = (int, float)
        if (
            not isinstance(family, str)
            or not family
            or type(generation) is not int
            or generation < 0
            or not (auth_time is None or type(auth_time) in number)
        ):
            raise TokenError("invalid token")
        try:
            expires_at = datetime.fromtimestamp(int(payload["exp"]), UTC)
            authenticated_at = (
                datetime.fromtimestamp(int(auth_time), UTC) if auth_time is not None else None
            )
        except (OverflowError, OSError, ValueError) as error:
            raise TokenError("invalid token") from error
        claims = Claims(
            purpose,
            payload["sub"],
            expires_at,
            str(payload["jti"]),
            session_id=context[0],
            room=context[1],
            node=context[2],
            family=family,
            generation=generation,
            authenticated_at=authenticated_at,
        )
        if purpose not in (Purpose.USER, Purpose.CALENDAR) and not claims.session_id:
            raise TokenError("token carries no session")
        if purpose is Purpose.CALENDAR and not claims.room:
            raise TokenError("calendar token names no room")
        return claims


def dump_claims(claims: Claims) -> str:
    """Verified claims as JSON, to stand behind a WebSocket ticket (no bearer secret)."""
    return json.dumps(
        {
            "purpose": claims.purpose.value,
            "user_id": claims.user_id,
            "expires_at": claims.expires_at.timestamp(),
            "token_id": claims.token_id,
            "session_id": claims.session_id,
            "room": claims.room,
            "node": claims.node,
            "family": claims.family,
            "generation": claims.generation,
            "authenticated_at": (
                claims.authenticated_at.timestamp() if claims.authenticated_at else None
            ),
        }
    )


def load_claims(raw: str) -> Claims:
    """The claims `dump_claims` wrote (this node's own JSON, from Redis)."""
    data = json.loads(raw)
    authenticated_at = data["authenticated_at"]
    return Claims(
        Purpose(data["purpose"]),
        data["user_id"],
        datetime.fromtimestamp(data["expires_at"], UTC),
        data["token_id"],
        data["session_id"],
        data["room"],
        data["node"],
        family=data["family"],
        generation=data["generation"],
        authenticated_at=(
            datetime.fromtimestamp(authenticated_at, UTC) if authenticated_at is not None else None
        ),
    )
