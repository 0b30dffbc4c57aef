"""`GET /api/ping`, `GET /api/nodes` and `POST /api/nodes/rank` on one in-process node
(no Serf: ranking falls back to the client's own samples). With real agents and
coordinates: tests/mesh/test_node_mesh.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api, error_of


async def test_ping_is_tiny_and_never_cached(api: Api) -> None:
    response = await api.client.get("/api/ping")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    # Pages of other nodes read its timing: one request measures a new connection's RTT.
    assert response.headers["Timing-Allow-Origin"] == "*"
    assert await response.get_json() == {"node": "node-1"}
    # The browser makes each probe's URL unique; the query changes nothing.
    probed = await api.client.get("/api/ping?probe=abc123")
    assert probed.status_code == 200
    assert await probed.get_json() == {"node": "node-1"}


async def test_nodes_without_a_mesh_have_no_coordinate(api: Api) -> None:
    nodes = (await (await api.client.get("/api/nodes")).get_json())["nodes"]
    assert [(n["name"], n["coordinate"], n["serf_status"]) for n in nodes] == [
        ("node-1", None, None)
    ]


async def test_rank_without_coordinates_uses_the_samples(api: Api) -> None:
    response = await api.client.post(
        "/api/nodes/rank", json={"samples": [{"node": "node-1", "rtt_ms": 12.5}]}
    )
    assert response.status_code == 200
    body = await response.get_json()
    assert body["probe_next"] == []  # nothing to suggest without coordinates
    ranked = body["nodes"]
    assert ranked == [
        {
            "name": "node-1",
            "region": "local",
            "url": "https://rooms.example.org",
            "ws_url": "wss://rooms.example.org/ws",
            "rtt_ms": 12.5,
            "measured": True,
        }
    ]
    # A sample to a node that does not exist changes nothing; the live node has no figure.
    response = await api.client.post(
        "/api/nodes/rank", json={"samples": [{"node": "elsewhere", "rtt_ms": 3}]}
    )
    ranked = (await response.get_json())["nodes"]
    assert [(n["name"], n["rtt_ms"], n["measured"]) for n in ranked] == [("node-1", None, False)]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"samples": []},
        {"samples": [{"node": "node-1"}]},
        {"samples": [{"node": "node-1", "rtt_ms": 0}]},
        {"samples": [{"node": "node-1", "rtt_ms": -1}]},
        {"samples": [{"node": "node-1", "rtt_ms": 1e9}]},
        {"samples": [{"node": "", "rtt_ms": 5}]},
        {"samples": [{"node": "node-1", "rtt_ms": "fast"}]},
        {"samples": [{"node": "node-1", "rtt_ms": 5}] * 17},
        {"samples": [{"node": "node-1", "rtt_ms": 5}], "extra": 1},
        {"samples": "node-1"},
    ],
)
async def test_rank_refuses_bad_samples(api: Api, body: Any) -> None:
    response = await api.client.post("/api/nodes/rank", json=body)
    assert response.status_code in (400, 422)
    error = await error_of(response)
    assert error["code"] and error["message"]
