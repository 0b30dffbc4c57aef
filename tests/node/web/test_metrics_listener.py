"""Issue 21 item 13: /metrics on a listener of its own (`metrics.listen`).

With it set, the public listener answers 404 for /metrics and the metrics listener serves
it (and nothing else); without it, /metrics stays where the contract has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from mesh.process import free_port
from node.config import ConfigError, load_settings
from node.local.launch import LocalNode
from node.web.app import create_metrics_app
from tests.conftest import Api, error_of


async def test_public_listener_refuses_metrics_when_they_have_their_own(make_app: Any) -> None:
    test_app = await make_app(metrics__listen="127.0.0.1:9464")
    api = Api(test_app.test_client())
    response = await api.client.get("/metrics")
    assert response.status_code == 404
    assert (await error_of(response))["code"] == "not_found"
    assert (await api.client.get("/api/ping")).status_code == 200

    metrics = create_metrics_app(test_app.app).test_client()
    response = await metrics.get("/metrics")
    assert response.status_code == 200
    text = await response.get_data(as_text=True)
    assert 'sfumesh_node_info{node="node-1",region="local"} 1.0' in text
    assert 'route="/api/ping"' in text  # the public listener's requests, counted
    for path in ("/", "/api/ping", "/healthz"):
        assert (await metrics.get(path)).status_code == 404


async def test_metrics_stay_public_by_default(api: Api) -> None:
    assert (await api.client.get("/metrics")).status_code == 200


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1:", ":9464", "127.0.0.1:99999", "h:x"])
def test_bad_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_settings(env={}, overrides={"metrics.listen": listen})


@pytest.mark.slow
async def test_a_node_serves_metrics_on_its_own_listener(
    node_processes: Callable[..., LocalNode],
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    node = await asyncio.to_thread(node_processes, extra_env={"SFUMESH_METRICS_LISTEN": listen})
    async with httpx.AsyncClient(timeout=10) as http:
        public = await http.get(f"{node.url}/metrics")
        assert public.status_code == 404
        assert public.json()["error"]["code"] == "not_found"
        private = await http.get(f"http://{listen}/metrics")
        assert private.status_code == 200
        assert 'sfumesh_node_info{node="node-1"' in private.text
        assert (await http.get(f"http://{listen}/api/ping")).status_code == 404
