"""E3 and operations: health, readiness, API description, structured logs without secrets."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from mesh.process import free_port
from node.config import ConfigError, load_settings
from node.log import setup_logging
from tests.conftest import Api


async def test_healthz_and_readyz(api: Api) -> None:
    assert (await api.client.get("/healthz")).status_code == 200
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert (await ready.get_json())["checks"] == {"redis": "ok", "store": "ok"}


async def test_readyz_fails_when_redis_is_unreachable(make_app: Any) -> None:
    test_app = await make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    response = await test_app.test_client().get("/readyz")
    assert response.status_code == 503
    body = await response.get_json()
    assert body["status"] == "not_ready" and body["checks"]["store"] == "ok"
    assert body["checks"]["redis"].startswith("unreachable")


async def test_openapi_and_docs_describe_the_contract(api: Api) -> None:
    spec = await (await api.client.get("/openapi.json")).get_json()
    for path in (
        "/api/users",
        "/api/auth/login",
        "/api/sessions",
        "/api/rooms",
        "/api/rooms/{slug}/messages",
    ):
        assert path in spec["paths"], path
    assert (await api.client.get("/docs")).status_code == 200


async def test_webapp_page_is_served_for_room_urls(api: Api) -> None:
    for path in ("/", "/r/caf%C3%A9"):
        response = await api.client.get(path)
        assert response.status_code == 200
        assert "<title>sfumesh</title>" in await response.get_data(as_text=True)


async def test_logs_are_json_lines_without_secrets(api: Api) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    setup_logging("DEBUG", stream)
    try:
        user_token = await api.user_token("alice")
        await api.session_token(user_token)
        await api.client.post("/api/auth/login", json={"login": "alice", "password": "wrong-one!"})
        logging.getLogger("test").info("probe", extra={"session_token": "abc", "room": "r1"})
    finally:
        root.handlers[:], root.level = saved_handlers, saved_level
    lines = stream.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    names = {event["event"] for event in events}
    assert {"user.created", "login.ok", "login.failed", "http.request"} <= names
    text = stream.getvalue()
    assert api.password not in text and "wrong-one!" not in text and user_token not in text
    probe = next(event for event in events if event["event"] == "probe")
    assert probe["session_token"] == "***" and probe["room"] == "r1"


def test_config_file_then_env_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'node_name = "from-file"\nregion = "eu"\nport = 9000\n'
        '[rooms]\ncreate_policy = "allowlist"\ncreators = ["alice"]\n'
        '[tokens]\nsigning_key_id = "k"\nkeys = { k = "' + "s" * 40 + '" }\n'
    )
    env = {"SFUMESH_REGION": "asia", "REDIS_URL": "redis://:pw@10.0.0.1:6379/0"}
    settings = load_settings(config, env=env, overrides={"port": 9100})
    assert (settings.node_name, settings.region, settings.port) == ("from-file", "asia", 9100)
    assert settings.rooms.creators == ["alice"]
    # Secrets never show in a printed or logged config.
    assert "pw@" not in repr(settings) and "s" * 40 not in repr(settings)
    assert settings.redis_url.get_secret_value() == "redis://:pw@10.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        ("port = 'eighty'", {}, "port"),
        ("unknown_setting = 1", {}, "unknown_setting"),
        ("[rooms]\ncreate_policy = 'nobody'", {}, "create_policy"),
        ("not toml [", {}, "config file"),
        ("", {"SFUMESH_TOKEN_KEYS": "{broken"}, "SFUMESH_TOKEN_KEYS"),
        (
            "",
            {"SFUMESH_TOKEN_KEYS": '{"k": "short"}', "SFUMESH_TOKEN_SIGNING_KEY_ID": "k"},
            "32 bytes",
        ),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, text: str, env: dict[str, str], problem: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_settings(config, env=env)


async def test_metrics_are_prometheus_text_with_bounded_labels(api: Api) -> None:
    token = await api.user_token("alice")
    await api.create_room(token, "café")
    for _ in range(3):
        await api.client.get("/api/rooms/café")
    await api.client.get("/api/rooms/nowhere")
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.get_data(as_text=True)
    route = 'route="/api/rooms/<slug>"'
    assert f'sfumesh_http_requests_total{{method="GET",{route},status="200"}} 3.0' in text
    assert f'sfumesh_http_requests_total{{method="GET",{route},status="404"}} 1.0' in text
    assert "café" not in text and "nowhere" not in text  # routes, never paths
    assert 'sfumesh_node_info{node="node-1",region="local"} 1.0' in text
    assert "sfumesh_ws_connections 0.0" in text and "sfumesh_redis_ok 1.0" in text
