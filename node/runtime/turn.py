"""TURN credentials for one session, in the TURN REST style coturn's `use-auth-secret` checks.

A client behind a strict NAT or firewall reaches the node's media through a TURN relay. The
TURN server and the nodes share one secret and nothing else: a node hands each connected
session (in its WebSocket `hello`) a username `expiry:session_id` and the password
base64(HMAC-SHA1(secret, username)); coturn recomputes the password from the username and
refuses it once `expiry` (Unix seconds) has passed. So no TURN password lives anywhere but
in the secret, a credential names the session it was given to (coturn logs it), and a leaked
one stops working by itself. (draft-uberti-behave-turn-rest-00; coturn's README.turnserver.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from node.config import TurnSettings


def turn_password(secret: str, username: str) -> str:
    """What coturn computes for `username` with `static-auth-secret = secret`."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def turn_username(session_id: str, expires_at: int) -> str:
    return f"{expires_at}:{session_id}"


def ice_servers(
    settings: TurnSettings, session_id: str, now: float | None = None
) -> list[dict[str, Any]]:
    """The RTCIceServer list (the W3C shape: urls, username, credential) for one session:
    empty without TURN configured."""
    if not settings.urls:
        return []
    expires_at = int(time.time() if now is None else now) + settings.credential_ttl_s
    username = turn_username(session_id, expires_at)
    return [
        {
            "urls": list(settings.urls),
            "username": username,
            "credential": turn_password(settings.secret.get_secret_value(), username),
        }
    ]
