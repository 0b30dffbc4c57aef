"""Posting to a room's chat (R4): the one write path, for the WebSocket and HTTP alike.

Both check the same things in the same order: the text's size (no normalisation yet), who
may post, the per-session rate limit (counted in Redis, so it holds across nodes), then the
text itself (combining-mark runs, NFC, hidden characters: the costlier work comes after the
rate limit, so a flood of frames cannot make the node normalise), then store the message
and publish it to the room's live event stream, so every open page on every node
shows it, whichever way it came. Who may post: a WebSocket connection in the room now
(`in_room_now`: its membership is re-checked in Redis), or over HTTP one of the room's people
(its creator, or a user who has joined it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any

from node.errors import Forbidden, Invalid
from node.runtime.live import Live
from node.store.messages import append_message, check_chat_size, clean_chat_text
from node.store.models import FileRef, Message, Room
from node.store.rooms import is_person


@dataclass(frozen=True)
class Poster:
    session_id: str
    user_id: str
    display_name: str
    #: a WebSocket connection that joined the room (else an HTTP request)
    in_room_now: bool


async def post_chat(live: Live, room: Room, poster: Poster, text: str) -> tuple[Message, str]:
    """Store `text` (as the client sent it) as `poster`'s message in `room` and tell the
    room; the message and the ISO time it carries."""
    try:
        check_chat_size(text)
    except ValueError as error:
        raise Invalid("invalid_text", f"text: {error}") from error
    if not poster.in_room_now and not await is_person(room, poster.user_id):
        raise Forbidden("not_joined", "only the room's people may post: join the room first")
    await live.sessions.admit_chat(
        room.slug, poster.session_id, live.settings.live.chat_per_s, in_room_now=poster.in_room_now
    )
    try:
        text = clean_chat_text(text)
    except ValueError as error:
        raise Invalid("invalid_text", f"text: {error}") from error
    message = await append_message(room, poster.user_id, poster.display_name, text)
    return message, await _announce(live, room, poster, message)


async def post_file(live: Live, room: Room, poster: Poster, file: FileRef) -> tuple[Message, str]:
    """Share a stored file in `room`'s chat: a message of kind file, told the room like any
    other (same stream, so every node shows it in the room's one order). The upload was
    checked (membership, size, quota) before it was kept; no chat rate limit here, as
    several photos dropped at once are one gesture."""
    message = await append_message(room, poster.user_id, poster.display_name, "", file=file)
    return message, await _announce(live, room, poster, message)


async def _announce(live: Live, room: Room, poster: Poster, message: Message) -> str:
    ts = message.ts.astimezone(UTC) if message.ts.tzinfo else message.ts.replace(tzinfo=UTC)
    event: dict[str, Any] = {
        "id": str(message.id),
        "from": {
            "session_id": poster.session_id,
            "user_id": poster.user_id,
            "display_name": poster.display_name,
        },
        "text": message.text,
        "ts": ts.isoformat(),
    }
    if message.file is not None:
        event["kind"] = "file"
        event["file"] = message.file.model_dump()
    await live.events.publish(room.slug, "chat", event)
    if live.metrics is not None:
        live.metrics.chat_messages.inc()
    ts_text: str = event["ts"]
    return ts_text


async def unshare_file(live: Live, room: Room, message_id: str | None, file_id: str) -> None:
    """Tell the room a shared file is gone (its message left the history with it)."""
    await live.events.publish(room.slug, "chat-deleted", {"id": message_id, "file": file_id})
