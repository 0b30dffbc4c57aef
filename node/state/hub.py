"""This node's WebSocket connections, and room events turned into client messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.state.events import PRESENCE, stream_id_key
from node.state.sessions import participant_state

log = logging.getLogger(__name__)

SEND_QUEUE = 1000
# Close codes (4000-4999 are the application's).
CLOSE_REPLACED = 4000
CLOSE_DRAINING = 4001
CLOSE_IDLE = 4002
CLOSE_SLOW = 4003


# (event id, event type, data)
RoomEvent = tuple[str, str, dict[str, Any]]


@dataclass(eq=False)
class Connection:
    session_id: str
    user_id: str
    display_name: str
    generation: int
    room: str | None = None
    # Room events up to and including this id are already in the client's `joined` snapshot.
    after: str = "0-0"
    outbox: asyncio.Queue[dict[str, Any] | None] = field(
        default_factory=lambda: asyncio.Queue(SEND_QUEUE)
    )
    close_code: int | None = None
    # Why the server closed it, when it did (the room hears this as the leave reason).
    close_reason: str | None = None
    # Set when a newer connection of this session took over: its cleanup must not run.
    superseded: bool = False
    # Told of every `error` sent (metrics).
    on_error: Callable[[str], None] | None = None
    # While joining: live room events wait here until the backlog is sent (Hub.catch_up).
    held: list[RoomEvent] | None = None
    # Ids of the chat messages sent lately (oldest first). A Redis failover can put one
    # message in the stream twice under two ids: the node read it from the old primary,
    # which died before a replica had it, and the publisher's retry wrote it again. The
    # client gets it once.
    sent_chats: dict[str, None] = field(default_factory=dict)
    # Who the client was told is in its room (session id -> participant), from the presence
    # messages sent: what a resync after a failover compares with Redis (`Hub.resync`).
    present: dict[str, dict[str, Any]] = field(default_factory=dict)

    def send(self, message: dict[str, Any]) -> None:
        if self.close_code is not None:
            return
        _track_presence(self.present, message)
        if self.on_error is not None and message.get("type") == "error":
            self.on_error(str(message.get("code")))
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("ws.slow_client", extra={"session_id": self.session_id})
            self.close(CLOSE_SLOW)

    def close(
        self, code: int, final: dict[str, Any] | None = None, reason: str | None = None
    ) -> None:
        """Send `final` (if any) after what is queued, then close the socket."""
        if self.close_code is not None:
            return
        self.close_reason = reason
        if final is not None:
            try:
                self.outbox.put_nowait(final)
            except asyncio.QueueFull:
                pass
        self.close_code = code
        try:
            self.outbox.put_nowait(None)
        except asyncio.QueueFull:
            # The sender stops at close_code even without seeing the marker.
            pass


class Hub:
    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.rooms: dict[str, set[Connection]] = {}
        # Called with a slug when its last local connection leaves (stop reading its events).
        self.on_room_empty: Callable[[str], None] | None = None
        # Called with (connection, slug) whenever a connection leaves a local room, however
        # it leaves (the media layer closes its peer connections and tracks).
        self.on_leave: Callable[[Connection, str], None] | None = None

    def add(self, conn: Connection) -> Connection | None:
        """Register a connection; returns the older one of the same session, if any."""
        previous = self.connections.get(conn.session_id)
        self.connections[conn.session_id] = conn
        return previous

    def remove(self, conn: Connection) -> None:
        if self.connections.get(conn.session_id) is conn:
            del self.connections[conn.session_id]
        self.leave_room(conn)

    def enter_room(self, conn: Connection, slug: str, after: str) -> None:
        """Join the local room; live events are held until `catch_up` sends the backlog."""
        self.leave_room(conn)
        conn.room = slug
        conn.after = after
        conn.held = []
        self.rooms.setdefault(slug, set()).add(conn)

    def catch_up(self, conn: Connection, slug: str, backlog: list[RoomEvent]) -> None:
        """Send the room's events after the connection's join (read from the stream), then
        those held meanwhile: each once, in stream order, whatever the reader had done."""
        held, conn.held = conn.held or [], None
        for event_id, event_type, data in sorted(
            backlog + held, key=lambda event: stream_id_key(event[0])
        ):
            if conn.room == slug:
                self._deliver_one(conn, slug, event_id, event_type, data)

    def leave_room(self, conn: Connection) -> str | None:
        """Returns the slug when this was the room's last local connection."""
        slug = conn.room
        conn.room = None
        conn.held = None
        if slug is None:
            return None
        if self.on_leave is not None:
            self.on_leave(conn, slug)
        members = self.rooms.get(slug)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.rooms[slug]
                if self.on_room_empty is not None:
                    self.on_room_empty(slug)
                return slug
        return None

    def supersede(self, session_id: str, generation: int) -> None:
        conn = self.connections.get(session_id)
        if conn is not None and conn.generation < generation:
            replace(conn, same_session=True)

    async def deliver(
        self, slug: str | None, event_id: str, event_type: str, data: dict[str, Any]
    ) -> None:
        if slug is None:
            if event_type == "superseded":
                self.supersede(str(data["session_id"]), int(data["generation"]))
            return
        for conn in list(self.rooms.get(slug, ())):
            if conn.held is not None:
                conn.held.append((event_id, event_type, data))
            else:
                self._deliver_one(conn, slug, event_id, event_type, data)

    def _deliver_one(
        self, conn: Connection, slug: str, event_id: str, event_type: str, data: dict[str, Any]
    ) -> None:
        if event_type == PRESENCE:
            if stream_id_key(conn.after) <= stream_id_key(event_id):
                resync(conn, slug, data["participants"])
            # (else it joined after that snapshot: its own `joined` is newer)
            return
        if stream_id_key(conn.after) >= stream_id_key(event_id):
            return  # already in its `joined` snapshot, or already sent
        conn.after = event_id
        if event_type == "chat" and not _first_time(conn, str(data.get("id"))):
            return
        message = client_message(event_type, data, slug)
        if event_type == "participant-replaced" and data["session_id"] == conn.session_id:
            self.leave_room(conn)
            replace(conn, same_session=False)
        elif (
            event_type == "participant-left"
            and data["session_id"] == conn.session_id
            and data.get("reason") in ("moved", "removed-by-owner")
        ):
            # Its membership ended behind its back (an HTTP join to another room, on any
            # node, or the room's creator removed it): it stops hearing this room, and is
            # told so. Every other way out is this connection's own doing, and its handler
            # has already let go of the room.
            self.leave_room(conn)
            conn.send({"type": "left", "room": slug, "reason": data["reason"]})
        elif message is not None:
            conn.send(message)


def _track_presence(present: dict[str, dict[str, Any]], message: dict[str, Any]) -> None:
    kind = message.get("type")
    if kind == "joined":
        present.clear()
        present.update({p["session_id"]: p for p in message["participants"]})
    elif kind == "participant-joined":
        present[message["participant"]["session_id"]] = message["participant"]
    elif kind in ("participant-left", "participant-replaced"):
        present.pop(message["session_id"], None)
    elif kind == "left":
        present.clear()


def resync(conn: Connection, slug: str, participants: list[dict[str, Any]]) -> None:
    """Bring what `conn`'s client was told of its room to `participants` (the room's active
    members as Redis holds them now), with the ordinary presence messages: a
    `participant-left` (reason `resync`) for each it believes in that is not there, a
    `participant-joined` for each it never heard of. Its own session is not touched."""
    there = {p["session_id"]: p for p in participants if p["session_id"] != conn.session_id}
    gone = [
        (session_id, p)
        for session_id, p in conn.present.items()
        if session_id not in there and session_id != conn.session_id
    ]
    for session_id, participant in gone:
        conn.send(
            {
                "type": "participant-left",
                "room": slug,
                "session_id": session_id,
                "user_id": participant.get("user_id"),
                "reason": "resync",
            }
        )
    added = [p for session_id, p in there.items() if session_id not in conn.present]
    for participant in added:
        conn.send({"type": "participant-joined", "room": slug, "participant": participant})
    if gone or added:
        log.info(
            "presence.resynced",
            extra={
                "session_id": conn.session_id,
                "room": slug,
                "gone": len(gone),
                "added": len(added),
            },
        )


#: chat ids a connection remembers: far more than a failover's few seconds of messages
SENT_CHATS_KEPT = 512


def _first_time(conn: Connection, chat_id: str) -> bool:
    if chat_id in conn.sent_chats:
        return False
    conn.sent_chats[chat_id] = None
    if len(conn.sent_chats) > SENT_CHATS_KEPT:
        del conn.sent_chats[next(iter(conn.sent_chats))]
    return True


def replace(conn: Connection, *, same_session: bool) -> None:
    """Close a connection that another took over. A newer connection of the same session
    owns the session now, so the old one's cleanup must not run; a replaced other session
    (same user, policy "replace") still ends its own session record on close."""
    conn.superseded = same_session
    conn.close(CLOSE_REPLACED, {"type": "session-replaced", "session_id": conn.session_id})


def client_message(event_type: str, data: dict[str, Any], slug: str) -> dict[str, Any] | None:
    if event_type == "participant-joined":
        return {
            "type": "participant-joined",
            "room": slug,
            "participant": {
                "session_id": data["session_id"],
                "user_id": data["user_id"],
                "display_name": data["display_name"],
                "node": data["node"],
                "state": participant_state(data.get("flags")),
            },
        }
    if event_type == "participant-state":
        # mic, camera, hand, screen share (W5): the whole state, so a missed one is harmless
        return {
            "type": "participant-state",
            "room": slug,
            "session_id": data["session_id"],
            "user_id": data["user_id"],
            "state": participant_state(data.get("state")),
        }
    if event_type == "participant-left":
        return {"type": "participant-left", "room": slug, **data}
    if event_type == "participant-replaced":
        return {"type": "participant-replaced", "room": slug, **data}
    if event_type in ("chat", "chat-deleted"):
        return {"type": event_type, "room": slug, **data}
    if event_type == "costs":
        # the room's books changed (R9): open pages reload them
        return {"type": "costs", "room": slug, **data}
    if event_type == "happening":
        return {"type": "happening", "room": slug, **data}
    return None
