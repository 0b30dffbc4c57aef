"""U5: each token has one purpose, expires, and is refused when tampered or foreign."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from node.config import TokenSettings, new_key
from node.web.tokens import Purpose, TokenError, TokenService
from tests.conftest import Api, bearer, error_of

KEY_A, KEY_B = new_key(), new_key()


def service(keys: dict[str, str], kid: str, **settings: object) -> TokenService:
    return TokenService(
        TokenSettings.model_validate({"keys": keys, "signing_key_id": kid, **settings})
    )


def test_round_trip_carries_the_claims() -> None:
    tokens = service({"a": KEY_A}, "a")
    issued = tokens.issue(Purpose.ROOM, "u1", session_id="s1", room="café", node="n1")
    claims = tokens.verify(issued.token, Purpose.ROOM)
    assert (claims.user_id, claims.session_id, claims.room, claims.node) == (
        "u1",
        "s1",
        "café",
        "n1",
    )
    assert claims.expires_at == issued.expires_at


@pytest.mark.parametrize("issued_as", list(Purpose))
@pytest.mark.parametrize("used_as", list(Purpose))
def test_a_token_is_refused_for_any_other_purpose(issued_as: Purpose, used_as: Purpose) -> None:
    tokens = service({"a": KEY_A}, "a")
    token = tokens.issue(issued_as, "u1", session_id="s1", room="r", node="n").token
    if issued_as is used_as:
        assert tokens.verify(token, used_as).purpose is used_as
    else:
        with pytest.raises(TokenError, match=f"not a {used_as.value} token"):
            tokens.verify(token, used_as)


def test_expired_token_is_refused() -> None:
    tokens = service({"a": KEY_A}, "a")
    token = tokens.issue(Purpose.USER, "u1", ttl_s=-1).token
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(token, Purpose.USER)


def test_tampered_payload_is_refused() -> None:
    tokens = service({"a": KEY_A}, "a")
    header, payload, signature = tokens.issue(Purpose.USER, "u1").token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="invalid"):
        tokens.verify(f"{header}.{forged}.{signature}", Purpose.USER)


def test_unknown_key_id_and_alg_none_are_refused() -> None:
    tokens = service({"a": KEY_A}, "a")
    foreign = service({"b": KEY_B}, "b").issue(Purpose.USER, "u1").token
    with pytest.raises(TokenError, match="unknown key"):
        tokens.verify(foreign, Purpose.USER)
    same_kid_other_secret = service({"a": KEY_B}, "a").issue(Purpose.USER, "u1").token
    with pytest.raises(TokenError, match="invalid"):
        tokens.verify(same_kid_other_secret, Purpose.USER)
    unsigned = jwt.encode(
        {"sub": "u1", "purpose": "user", "iss": "sfumesh", "aud": "sfumesh", "exp": 9999999999},
        key="",
        algorithm="none",
        headers={"kid": "a"},
    )
    with pytest.raises(TokenError):
        tokens.verify(unsigned, Purpose.USER)
    with pytest.raises(TokenError, match="malformed"):
        tokens.verify("not-a-token", Purpose.USER)


def test_other_issuer_or_audience_is_refused() -> None:
    tokens = service({"a": KEY_A}, "a")
    for other in ({"issuer": "elsewhere"}, {"audience": "elsewhere"}):
        token = service({"a": KEY_A}, "a", **other).issue(Purpose.USER, "u1").token
        with pytest.raises(TokenError, match="invalid"):
            tokens.verify(token, Purpose.USER)


def test_rotation_signs_with_new_key_and_still_verifies_old_tokens() -> None:
    old = service({"a": KEY_A}, "a")
    rotated = service({"a": KEY_A, "b": KEY_B}, "b")
    old_token = old.issue(Purpose.USER, "u1").token
    new_token = rotated.issue(Purpose.USER, "u1").token
    assert jwt.get_unverified_header(new_token)["kid"] == "b"
    assert rotated.verify(old_token, Purpose.USER).user_id == "u1"
    # Once the old key is dropped, its tokens stop working.
    with pytest.raises(TokenError, match="unknown key"):
        service({"b": KEY_B}, "b").verify(old_token, Purpose.USER)


def test_settings_refuse_short_keys_and_unknown_signing_id() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenSettings.model_validate({"keys": {"a": "short"}, "signing_key_id": "a"})
    with pytest.raises(ValueError, match=r"not in tokens\.keys"):
        TokenSettings.model_validate({"keys": {"a": KEY_A}, "signing_key_id": "b"})


def test_session_and_room_tokens_need_their_context() -> None:
    tokens = service({"a": KEY_A}, "a")
    with pytest.raises(ValueError):
        tokens.issue(Purpose.SESSION, "u1")
    with pytest.raises(ValueError):
        tokens.issue(Purpose.ROOM, "u1", session_id="s1")


async def test_api_token_chain_refuses_wrong_purpose(api: Api) -> None:
    user_token = await api.user_token("alice")
    session_token = await api.session_token(user_token)
    await api.create_room(user_token, "lobby")

    # A session token is not a user token, and the other way round.
    for path, method in (("/api/users/me", "GET"), ("/api/sessions", "POST")):
        response = await api.client.open(
            path, method=method, headers=bearer(session_token), json=None
        )
        assert response.status_code == 401, path
        assert (await error_of(response))["message"] == "not a user token"
    response = await api.client.get("/api/rooms/lobby/messages", headers=bearer(user_token))
    assert response.status_code == 401
    assert (await error_of(response))["message"] == "not a session token"
    response = await api.client.get("/api/rooms/lobby/messages", headers=bearer(session_token))
    assert response.status_code == 200


async def test_session_tokens_carry_distinct_session_ids(api: Api) -> None:
    user_token = await api.user_token("alice")
    grants = [
        await (await api.client.post("/api/sessions", headers=bearer(user_token))).get_json()
        for _ in range(3)
    ]
    assert len({grant["session_id"] for grant in grants}) == 3
    for grant in grants:
        _, payload, _ = grant["session_token"].split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        assert claims["session_id"] == grant["session_id"] and claims["purpose"] == "session"
