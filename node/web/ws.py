"""WebSocket signalling `/ws?ticket=...` or `/ws?session_token=...` (S1-S3, live R4).

The ticket (POST /api/sessions/ws-ticket) is single-use and lives seconds, so a URL that
ends up in a log or a history is worth nothing; the session token in the URL is still
accepted (the public contract names it).

One connection = one session generation. Every client frame may carry an `id` and gets an
`ack` or an `error` with the same id. However a connection ends (close, idle timeout,
`session-replaced`, the node draining), its cleanup runs once, as its own task, and names its
generation, so it can never end a newer connection of the same session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint, Response, jsonify, websocket
from redis.exceptions import RedisError

from node.errors import DomainError, legacy_fields
from node.media.choice import View
from node.media.session import MediaError, MediaSession
from node.runtime.chat import Poster, post_chat
from node.runtime.turn import ice_servers
from node.state.hub import CLOSE_IDLE, Connection, RoomEvent, replace
from node.state.lock import LockError
from node.state.sessions import PARTICIPANT_STATE_DEFAULTS
from node.store.messages import MAX_RAW_CHAT_CHARS
from node.store.rooms import get_room
from node.web.auth import token_user
from node.web.context import NodeContext, node_context
from node.web.peers import client_address
from node.web.tokens import Claims, Purpose, TokenError, load_claims

log = logging.getLogger(__name__)

ws_blueprint = Blueprint("ws", __name__)


class ClientError(Exception):
    def __init__(self, code: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: extra fields of the `error` message (e.g. `pc` for media errors)
        self.fields = fields


Handler = Callable[[NodeContext, Connection, dict[str, Any]], Awaitable[dict[str, Any] | None]]


def _refuse(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


#: tickets are `secrets.token_urlsafe(32)`: 43 characters; anything much longer is not one
_MAX_TICKET_CHARS = 128


async def _ticket_claims(context: NodeContext, ticket: str) -> Claims:
    """The session claims a ticket stands for; the ticket is used up by asking."""
    if not ticket or len(ticket) > _MAX_TICKET_CHARS or not ticket.isascii():
        raise TokenError("malformed ticket")
    raw = await context.token_state.take_ticket(ticket)
    if raw is None:
        raise TokenError("unknown, used or expired ticket")
    claims = load_claims(raw)
    if claims.purpose is not Purpose.SESSION:
        raise TokenError("not a session ticket")
    if claims.expires_at <= datetime.now(UTC):
        raise TokenError("token expired")
    return claims


@ws_blueprint.websocket("/ws")
async def signalling() -> Any:
    context = node_context()
    live = context.live
    ticket = websocket.args.get("ticket")
    try:
        if ticket is not None:
            # Before the ticket is spent: a client sent elsewhere keeps it for that node.
            if live.draining:
                return _refuse(503, "draining", "this node is shutting down; connect to another")
            claims = await _ticket_claims(context, ticket)
        else:
            token = websocket.args.get("session_token", "")
            claims = context.tokens.verify(token, Purpose.SESSION)
    except TokenError as error:
        return _refuse(401, "unauthorized", str(error))
    if live.draining:
        return _refuse(503, "draining", "this node is shutting down; connect to another")
    try:
        user = await token_user(claims)
    except TokenError as error:
        return _refuse(401, "unauthorized", str(error))
    if claims.session_id is None:
        return _refuse(401, "unauthorized", "token carries no session")
    address = client_address(websocket, context.settings.trusted_proxies)
    over = context.ws_slots.take(claims.user_id, address, claims.session_id)
    if over is not None:
        context.metrics.ws_errors.labels("too_many_connections").inc()
        log.warning("ws.refused", extra={"reason": f"too many connections per {over}"})
        return _refuse(
            429,
            "too_many_connections",
            f"too many open connections for this {over} on this node; close one first",
        )
    try:
        return await _serve(context, claims.session_id, claims.user_id, user.display_name)
    finally:
        context.ws_slots.give_back(claims.user_id, address, claims.session_id)


async def _serve(context: NodeContext, session_id: str, user_id: str, display_name: str) -> Any:
    """One accepted connection, from `hello` to its cleanup."""
    live = context.live
    connected = await live.sessions.connect(session_id, user_id)
    conn = Connection(session_id, user_id, display_name, connected.record.generation)
    conn.on_error = lambda code: context.metrics.ws_errors.labels(code).inc()
    older = live.hub.add(conn)
    if older is not None:
        replace(older, same_session=True)
    elif connected.previous_node and connected.previous_node != live.name:
        await live.events.send_to_node(
            connected.previous_node,
            "superseded",
            {"session_id": conn.session_id, "generation": conn.generation},
        )
    await websocket.accept()
    log.info(
        "ws.open",
        extra={"session_id": conn.session_id, "generation": conn.generation},
    )
    conn.send(
        {
            "type": "hello",
            "session_id": conn.session_id,
            "node": live.name,
            "region": live.settings.region,
            "generation": conn.generation,
            # TURN credentials of this session (node/runtime/turn.py): only to a socket
            # that proved its session, and fresh on every connection.
            "ice_servers": ice_servers(context.settings.turn, conn.session_id),
        }
    )
    reason = "closed"
    sender = asyncio.create_task(_send_loop(conn), name="ws-send")
    receiver = asyncio.create_task(_receive_loop(context, conn), name="ws-receive")
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if receiver in done and not receiver.cancelled() and receiver.exception() is None:
            reason = receiver.result()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                reason = "failed"
                log.error(
                    "ws.task_failed",
                    extra={"session_id": conn.session_id, "task": task.get_name()},
                    exc_info=task.exception(),
                )
    finally:
        for task in (sender, receiver):
            task.cancel()
        cleanup = live.run_cleanup(_finish(context, conn, conn.close_reason or reason))
        await asyncio.shield(cleanup)
    if conn.close_code is not None:
        await websocket.close(conn.close_code)
    return None


async def _finish(context: NodeContext, conn: Connection, reason: str) -> None:
    live = context.live
    live.hub.remove(conn)
    await live.end_connection(conn, reason)
    log.info("ws.closed", extra={"session_id": conn.session_id, "reason": reason})


async def _send_loop(conn: Connection) -> None:
    while True:
        message = await conn.outbox.get()
        if message is None:
            return
        await websocket.send(json.dumps(message, separators=(",", ":"), ensure_ascii=False))
        if conn.close_code is not None and conn.outbox.empty():
            return


async def _receive_loop(context: NodeContext, conn: Connection) -> str:
    """Returns why the connection ended."""
    settings = context.settings.live
    allowance = float(settings.ws_frames_per_s)
    last = time.monotonic()
    while True:
        try:
            raw = await asyncio.wait_for(websocket.receive(), settings.ws_idle_timeout_s)
        except TimeoutError:
            conn.close(CLOSE_IDLE, _error(None, "idle_timeout", "no frames"))
            return "timeout"
        now = time.monotonic()
        allowance = min(
            float(settings.ws_frames_per_s),
            allowance + (now - last) * settings.ws_frames_per_s,
        )
        last = now
        if allowance < 1:
            # Not handled, but still answered by id, so a client waiting for it hears.
            frame_id = None
            if isinstance(raw, str) and len(raw) <= settings.ws_max_frame_bytes:
                try:
                    frame = json.loads(raw)
                except (ValueError, RecursionError):
                    frame = None
                candidate = frame.get("id") if isinstance(frame, dict) else None
                # As in _handle_frame: an integer or a string of <= 64 characters.
                if (
                    isinstance(candidate, str | int)
                    and not isinstance(candidate, bool)
                    and len(str(candidate)) <= 64
                    and not any("\ud800" <= char <= "\udfff" for char in str(candidate))
                ):
                    frame_id = candidate
            conn.send(_error(frame_id, "rate_limited", "too many frames; slow down"))
            continue
        allowance -= 1
        try:
            await _handle_frame(context, conn, raw)
        except Exception:
            # A bug, not bad input: say so in the log, and end this connection (its cleanup
            # ends the session) rather than go on with state half changed.
            log.exception("ws.frame_failed", extra={"session_id": conn.session_id})
            conn.close(
                1011,  # the WebSocket protocol's "internal error"
                {"type": "error", "code": "internal", "message": "the node failed; reconnect"},
            )
            return "error"


async def _handle_frame(context: NodeContext, conn: Connection, raw: str | bytes) -> None:
    limit = context.settings.live.ws_max_frame_bytes
    if not isinstance(raw, str):
        # A binary frame; an empty one arrives as None (Quart reads `bytes or text`).
        if isinstance(raw, bytes) and len(raw) > limit:
            conn.send(_error(None, "frame_too_large", f"frames are limited to {limit} bytes"))
        else:
            conn.send(_error(None, "bad_frame", "frames are JSON objects in text frames"))
        return
    # An answer to the node's subscribe offer grows with the offer (the room's tracks): that
    # one message may be larger, up to what the latest offer allows, within a hard bound.
    answer_limit = min(
        context.live.media.answer_limit(conn), context.settings.live.ws_max_answer_bytes
    )
    allowed = max(limit, answer_limit)
    # The limit is in bytes: a text frame of N characters is up to 4N bytes of UTF-8.
    size = len(raw)
    if size <= allowed < 4 * size:
        size = len(raw.encode("utf-8", "surrogatepass"))
    if size > allowed:
        conn.send(_error(None, "frame_too_large", f"frames are limited to {limit} bytes"))
        return
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):
        conn.send(_error(None, "bad_frame", "frames are JSON objects"))
        return
    if not isinstance(frame, dict):
        conn.send(_error(None, "bad_frame", "frames are JSON objects"))
        return
    if size > limit and (frame.get("type"), frame.get("pc")) != ("answer", "subscribe"):
        conn.send(_error(None, "frame_too_large", f"frames are limited to {limit} bytes"))
        return
    frame_id = frame.get("id")
    # An id the reply can carry back as it came: an integer, or a string of up to 64
    # characters without lone surrogates (which JSON allows and UTF-8 cannot send back).
    if not (
        frame_id is None
        or (
            isinstance(frame_id, str | int)
            and not isinstance(frame_id, bool)
            and len(str(frame_id)) <= 64
            and not any("\ud800" <= char <= "\udfff" for char in str(frame_id))
        )
    ):
        conn.send(_error(None, "bad_frame", "id must be a string or integer of <= 64 chars"))
        return
    frame_type = frame.get("type")
    handler = HANDLERS.get(frame_type) if isinstance(frame_type, str) else None
    context.metrics.ws_frames.labels(frame_type if handler is not None else "unknown").inc()
    if handler is None:
        if isinstance(frame_type, str):
            message = f"unknown message type {frame_type[:64]!r}"
        else:
            message = "type must be a string naming a message type"
        conn.send(_error(frame_id, "unknown_type", message))
        return
    try:
        reply = await handler(context, conn, frame)
    except ClientError as error:
        conn.send({**_error(frame_id, error.code, error.message), **error.fields})
        return
    except DomainError as error:
        conn.send(_error(frame_id, error.code, error.message))
        return
    except (RedisError, OSError, LockError) as error:
        log.warning("ws.state_unavailable", extra={"error": str(error)})
        conn.send(_error(frame_id, "unavailable", "room state is unavailable; try again"))
        return
    if reply is not None:
        conn.send({**reply, **({"id": frame_id} if frame_id is not None else {})})


def _error(frame_id: Any, code: str, message: str) -> dict[str, Any]:
    error: dict[str, Any] = {"type": "error", "code": code, "message": message}
    error.update(legacy_fields(code))
    if frame_id is not None:
        error["id"] = frame_id
    return error


def _string_field(frame: dict[str, Any], name: str, max_len: int) -> str:
    value = frame.get(name)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ClientError("bad_frame", f"{name} must be a non-empty string")
    return value


async def _ping(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    return {"type": "pong"}


async def _join(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    live = context.live
    token = _string_field(frame, "room_token", 4096)
    # Tokens are ASCII; anything else (a lone surrogate, say) would fail in the JWT library.
    if not token.isascii():
        raise ClientError("bad_token", "malformed token")
    try:
        claims = context.tokens.verify(token, Purpose.ROOM)
    except TokenError as error:
        raise ClientError("bad_token", str(error)) from error
    if (claims.session_id, claims.user_id, claims.node) != (
        conn.session_id,
        conn.user_id,
        live.name,
    ):
        raise ClientError("wrong_token", "this room token is for another session or node")
    try:
        # Logged out or password changed since the HTTP join: the room token goes too.
        await token_user(claims)
    except TokenError as error:
        raise ClientError("bad_token", str(error)) from error
    slug = str(claims.room)
    if conn.room == slug:
        raise ClientError("already_joined", "this session is already in the room")
    result = await live.sessions.activate(slug, conn.session_id, conn.generation)
    if result is None:
        raise ClientError(
            "not_admitted", "no pending join for this connection: POST /api/rooms/{slug}/join"
        )
    membership, event_id, active = result
    if conn.room is not None:
        live.hub.leave_room(conn)
    # The snapshot holds the room as of `event_id`; every event after it reaches this
    # connection once, in order, whether the reader saw it before or after this point.
    live.hub.enter_room(conn, slug, event_id)
    conn.send(
        {
            "type": "joined",
            "room": slug,
            "participants": [m.public() for m in active],
            "self": membership.public(),
        }
    )
    backlog: list[RoomEvent] = []
    try:
        await live.events.watch(slug, event_id)
        backlog = await live.events.events_after(slug, event_id)
    finally:
        live.hub.catch_up(conn, slug, backlog)
    # A late joiner gets the room's published tracks (the node offers on `pc: subscribe`).
    live.media.joined(conn)
    return {"type": "ack", "room": slug}


async def _leave(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    live = context.live
    slug = conn.room
    if slug is None:
        raise ClientError("not_in_room", "this session is not in a room")
    await live.sessions.leave(slug, conn.session_id, conn.generation, "leave")
    live.hub.leave_room(conn)
    return {"type": "ack", "room": slug}


async def _chat(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    live = context.live
    slug = conn.room
    if slug is None:
        raise ClientError("not_in_room", "join a room before chatting")
    text = frame.get("text")
    if not isinstance(text, str) or len(text) > MAX_RAW_CHAT_CHARS:
        raise ClientError("bad_frame", "text must be a string")
    room = await get_room(slug)
    poster = Poster(conn.session_id, conn.user_id, conn.display_name, in_room_now=True)
    # Not normalised here: post_chat does that after the rate limit (invalid_text).
    message, ts = await post_chat(live, room, poster, text)
    return {"type": "ack", "message_id": str(message.id), "ts": ts}


# A publisher's mid: what browsers and aiortc write (digits, short tokens).
_MID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_MID = 16


def _state_changes(frame: dict[str, Any]) -> dict[str, Any]:
    """The `state` object of a `participant-state` frame, checked field by field: known
    names only, booleans, `screen_mid` a short token or null. Anything else is refused
    whole, so a bad frame changes nothing."""
    changes = frame.get("state")
    if not isinstance(changes, dict) or not changes:
        raise ClientError("bad_frame", "state must be a non-empty object")
    for name, value in changes.items():
        if name not in PARTICIPANT_STATE_DEFAULTS:
            raise ClientError("bad_frame", f"unknown state field {str(name)[:64]!r}")
        if name == "screen_mid":
            if value is not None and not (
                isinstance(value, str)
                and 0 < len(value) <= _MAX_MID
                and all(char in _MID_CHARS for char in value)
            ):
                raise ClientError("bad_frame", "screen_mid must be a short token or null")
        elif not isinstance(value, bool):
            raise ClientError("bad_frame", f"{name} must be true or false")
    return changes


async def _participant_state(
    context: NodeContext, conn: Connection, frame: dict[str, Any]
) -> dict[str, Any]:
    """Microphone, camera, hand, screen share (W5): stored with the membership and sent to
    the whole room, on every node, as `participant-state`."""
    slug = conn.room
    if slug is None:
        raise ClientError("not_in_room", "join a room first")
    changes = _state_changes(frame)
    state = await context.live.sessions.set_state(slug, conn.session_id, conn.generation, changes)
    if state is None:
        raise ClientError("not_in_room", "this session is no longer in the room")
    return {"type": "ack", "state": state}


_PCS = ("publish", "subscribe")
_MAX_SDP = 60000


def _media_session(context: NodeContext, conn: Connection, pc: str) -> MediaSession:
    try:
        return context.live.media.session(conn)
    except MediaError as error:
        raise ClientError(error.code, error.message, pc=pc) from error


def _pc_field(frame: dict[str, Any], expected: str | None = None) -> str:
    pc = frame.get("pc")
    if pc not in _PCS or (expected is not None and pc != expected):
        allowed = expected or " or ".join(_PCS)
        raise ClientError("bad_frame", f"pc must be {allowed!r}")
    return str(pc)


async def _offer(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    """The client's offer for its publish connection; the node answers it."""
    _pc_field(frame, "publish")
    sdp = _string_field(frame, "sdp", _MAX_SDP)
    session = _media_session(context, conn, "publish")
    try:
        answer = await session.publish_offer(sdp)
    except MediaError as error:
        raise ClientError(error.code, error.message, pc="publish") from error
    return {"type": "answer", "pc": "publish", "sdp": answer}


async def _answer(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    """The client's answer to the node's subscribe offer."""
    _pc_field(frame, "subscribe")
    # The frame's size was checked against the offer's answer limit already.
    sdp = _string_field(frame, "sdp", max(_MAX_SDP, context.settings.live.ws_max_answer_bytes))
    session = _media_session(context, conn, "subscribe")
    try:
        await session.subscribe_answer(sdp)
    except MediaError as error:
        raise ClientError(error.code, error.message, pc="subscribe") from error
    return {"type": "ack"}


async def _candidate(
    context: NodeContext, conn: Connection, frame: dict[str, Any]
) -> dict[str, Any]:
    pc = _pc_field(frame)
    session = _media_session(context, conn, pc)
    try:
        await session.add_candidate(pc, frame.get("candidate"))
    except MediaError as error:
        raise ClientError(error.code, error.message, pc=pc) from error
    return {"type": "ack"}


#: at most this many tiles in one `view` message; sizes up to this many pixels
_MAX_VIEW_TILES = 64
_MAX_VIEW_PIXELS = 16384
#: the highest frame rate a tile may ask for (`fps`, optional)
_MAX_VIEW_FPS = 240


def _int_field(tile: dict[str, Any], name: str) -> int:
    value = tile.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_VIEW_PIXELS:
        raise ClientError("bad_frame", f"a tile's {name} must be an integer 0..{_MAX_VIEW_PIXELS}")
    return value


async def _view(context: NodeContext, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
    """How the client shows the tracks it receives: `tiles` maps a subscribe m-line's mid
    to {width, height, visible, fps?} (device pixels; `fps` optional: the frame rate the
    tile needs). A simulcast track's layer follows (the lowest at least as tall as its
    tile; with temporal layers, the fewest that give `fps`); a hidden tile gets no video.
    Replaces what the client said before."""
    tiles = frame.get("tiles")
    if not isinstance(tiles, dict) or len(tiles) > _MAX_VIEW_TILES:
        raise ClientError("bad_frame", f"tiles must be an object of at most {_MAX_VIEW_TILES}")
    views: dict[str, View] = {}
    for mid, tile in tiles.items():
        if not isinstance(mid, str) or not 0 < len(mid) <= 32 or not isinstance(tile, dict):
            raise ClientError("bad_frame", "tiles maps a mid to {width, height, visible}")
        visible = tile.get("visible", True)
        if not isinstance(visible, bool):
            raise ClientError("bad_frame", "a tile's visible must be true or false")
        fps = tile.get("fps")
        if fps is not None and (
            isinstance(fps, bool)
            or not isinstance(fps, int | float)
            or not 1 <= fps <= _MAX_VIEW_FPS
        ):
            raise ClientError("bad_frame", f"a tile's fps must be a number 1..{_MAX_VIEW_FPS}")
        views[mid] = View(
            _int_field(tile, "width"),
            _int_field(tile, "height"),
            visible,
            None if fps is None else float(fps),
        )
    session = _media_session(context, conn, "subscribe")
    session.set_views(views)
    return {"type": "ack"}


HANDLERS: dict[str, Handler] = {
    "ping": _ping,
    "join": _join,
    "leave": _leave,
    "chat": _chat,
    "participant-state": _participant_state,
    "offer": _offer,
    "answer": _answer,
    "candidate": _candidate,
    "view": _view,
}
