from tests.conftest import Api, bearer


async def test_signup_login_room_chat(api: Api) -> None:
    user_token = await api.user_token("alice")
    session_token = await api.session_token(user_token)
    room = await api.create_room(user_token, "Café-☕")
    assert room["slug"] == "café-☕"
    assert room["url"] == "https://rooms.example.org/r/caf%C3%A9-%E2%98%95"
    response = await api.client.post(
        "/api/rooms/café-☕/messages", json={"text": "hi"}, headers=bearer(session_token)
    )
    assert response.status_code == 201
    response = await api.client.get("/api/rooms/CAFÉ-☕/messages", headers=bearer(session_token))
    assert [m["text"] for m in (await response.get_json())["messages"]] == ["hi"]
