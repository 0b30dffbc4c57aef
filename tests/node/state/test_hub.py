"""A chat message that reaches a node twice under two stream ids (a Redis failover: read
from the old primary, lost with it, written again by the publisher's retry) is sent to each
connection once."""

from __future__ import annotations

from typing import Any

from node.state.hub import SENT_CHATS_KEPT, Connection, Hub


def _chat(message_id: str) -> dict[str, Any]:
    return {"id": message_id, "from": {"session_id": "s-2"}, "text": message_id, "ts": "t"}


def _sent(conn: Connection) -> list[dict[str, Any]]:
    messages = []
    while not conn.outbox.empty():
        message = conn.outbox.get_nowait()
        assert message is not None
        messages.append(message)
    return messages


async def test_a_chat_written_twice_is_sent_once() -> None:
    hub = Hub()
    conn = Connection("s-1", "u-1", "One", generation=1)
    hub.add(conn)
    hub.enter_room(conn, "lobby", "0-0")
    hub.catch_up(conn, "lobby", [])
    await hub.deliver("lobby", "100-0", "chat", _chat("m1"))
    await hub.deliver("lobby", "101-0", "chat", _chat("m2"))
    await hub.deliver("lobby", "105-0", "chat", _chat("m1"))  # m1 again, under a new id
    await hub.deliver("lobby", "106-0", "chat", _chat("m3"))
    assert [m["id"] for m in _sent(conn)] == ["m1", "m2", "m3"]
    # The memory is bounded: the oldest ids go first.
    for index in range(SENT_CHATS_KEPT):
        await hub.deliver("lobby", f"{200 + index}-0", "chat", _chat(f"n{index}"))
    assert len(conn.sent_chats) == SENT_CHATS_KEPT and "m1" not in conn.sent_chats


def _person(session_id: str) -> dict[str, Any]:
    return {"session_id": session_id, "user_id": f"u-{session_id}", "display_name": session_id}


async def test_a_presence_snapshot_sends_only_the_difference_and_in_stream_order() -> None:
    """After a failover the node re-reads the room's members (`presence`): each connection
    is told who joined or left without it hearing, nothing else, and never about itself; a
    connection that joined after the snapshot keeps its newer `joined`."""
    hub = Hub()
    old = Connection("s-1", "u-1", "One", generation=1)
    hub.add(old)
    hub.enter_room(old, "lobby", "100-0")
    old.send({"type": "joined", "room": "lobby", "participants": [_person("s-1"), _person("s-2")]})
    hub.catch_up(old, "lobby", [])
    newer = Connection("s-9", "u-9", "Nine", generation=1)
    hub.add(newer)
    hub.enter_room(newer, "lobby", "300-0")
    hub.catch_up(newer, "lobby", [])
    _sent(old)
    # s-2 left and s-3 joined in events this node never read; s-1 itself is not listed.
    await hub.deliver("lobby", "200-0", "presence", {"participants": [_person("s-3")]})
    sent = _sent(old)
    assert [
        (m["type"], m.get("session_id", m.get("participant", {}).get("session_id"))) for m in sent
    ] == [
        ("participant-left", "s-2"),
        ("participant-joined", "s-3"),
    ]
    assert sent[0]["reason"] == "resync" and set(old.present) == {"s-1", "s-3"}
    assert _sent(newer) == []
    # The same snapshot again changes nothing.
    await hub.deliver("lobby", "200-0", "presence", {"participants": [_person("s-3")]})
    assert _sent(old) == []
