"""R4 storage: history newest first, pages that never skip or repeat a message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from node.store.models import Message, Room
from tests.conftest import Api, bearer, error_of


async def _walk(api: Api, slug: str, token: str, limit: int) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    before: str | None = None
    while True:
        query = f"limit={limit}" + (f"&before={before}" if before else "")
        response = await api.client.get(
            f"/api/rooms/{slug}/messages?{query}", headers=bearer(token)
        )
        assert response.status_code == 200, await response.get_data(as_text=True)
        page = await response.get_json()
        pages.append(page["messages"])
        before = page["next_before"]
        if before is None:
            return pages


async def test_pages_cover_every_message_once_newest_first(api: Api) -> None:
    user_token = await api.user_token("alice")
    session = await api.session_token(user_token)
    await api.create_room(user_token, "history")
    room = await Room.find_one(Room.slug == "history")
    assert room is not None
    base = datetime(2026, 1, 1, tzinfo=UTC)
    # Groups of five share one timestamp: the cursor must order ties by id, not lose them.
    await Message.insert_many(
        [
            Message(
                room="history",
                author_id="u",
                author_name="A",
                text=str(i),
                ts=base + timedelta(seconds=i // 5),
            )
            for i in range(53)
        ]
    )
    pages = await _walk(api, "history", session, limit=10)
    assert [len(page) for page in pages] == [10, 10, 10, 10, 10, 3]
    seen = [m for page in pages for m in page]
    assert len({m["id"] for m in seen}) == 53
    keys = [(m["ts"], m["id"]) for m in seen]
    assert keys == sorted(keys, reverse=True)

    # A message written while paging (newer) does not shift older pages.
    first = pages[0]
    await api.client.post(
        "/api/rooms/history/messages", json={"text": "late"}, headers=bearer(session)
    )
    again = await api.client.get(
        f"/api/rooms/history/messages?limit=10&before={first[-1]['id']}", headers=bearer(session)
    )
    assert [m["id"] for m in (await again.get_json())["messages"]] == [m["id"] for m in pages[1]]


async def test_default_and_maximum_page_size(api: Api) -> None:
    user_token = await api.user_token("alice")
    session = await api.session_token(user_token)
    await api.create_room(user_token, "big-room")
    await Message.insert_many(
        [Message(room="big-room", author_id="u", author_name="A", text=str(i)) for i in range(120)]
    )
    page = await (
        await api.client.get("/api/rooms/big-room/messages", headers=bearer(session))
    ).get_json()
    assert len(page["messages"]) == 50
    page = await (
        await api.client.get("/api/rooms/big-room/messages?limit=100", headers=bearer(session))
    ).get_json()
    assert len(page["messages"]) == 100
    template = "/api/rooms/big-room/messages?before=&limit="  # the contract's, filled as is
    page = await (await api.client.get(template, headers=bearer(session))).get_json()
    assert len(page["messages"]) == 50
    response = await api.client.get(
        "/api/rooms/big-room/messages?limit=101", headers=bearer(session)
    )
    assert response.status_code == 422
    await error_of(response)


async def test_posted_message_has_author_and_stays_in_its_room(api: Api) -> None:
    user_token = await api.user_token("alice")
    session = await api.session_token(user_token)
    await api.create_room(user_token, "one")
    await api.create_room(user_token, "two")
    response = await api.client.post(
        "/api/rooms/one/messages",
        json={"text": "  line one\r\nline two  "},
        headers=bearer(session),
    )
    assert response.status_code == 201
    message = await response.get_json()
    assert message["text"] == "line one\nline two"
    assert message["author"]["display_name"] == "Alice" and message["room"] == "one"
    other = await (
        await api.client.get("/api/rooms/two/messages", headers=bearer(session))
    ).get_json()
    assert other == {"messages": [], "next_before": None}
    # A cursor from another room is refused, not silently applied.
    response = await api.client.get(
        f"/api/rooms/two/messages?before={message['id']}", headers=bearer(session)
    )
    assert response.status_code == 422
