"""Node processes on this machine, for `sfumesh demo`, benchmarks and multi-process tests."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from node.services import BackingServices, ManagedProcess, ServiceError, free_port


@dataclass
class LocalNode:
    name: str
    url: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def node_env(
    services: BackingServices,
    token_keys: dict[str, str],
    *,
    name: str,
    port: int,
    data_dir: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": services.redis_url,
            "MONGODB_URI": services.mongodb_uri,
            "SFUMESH_TOKEN_KEYS": json.dumps(token_keys),
            "SFUMESH_TOKEN_SIGNING_KEY_ID": next(iter(token_keys)),
            "SFUMESH_NODE_NAME": name,
            "SFUMESH_HOST": "127.0.0.1",
            "SFUMESH_PORT": str(port),
            "SFUMESH_DATA_DIR": str(data_dir),
        }
    )
    env.update(extra or {})
    return env


def wait_ready(node: LocalNode, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = node.process.exit_code()
        if code is not None:
            raise ServiceError(
                f"node {node.name} exited with code {code}:\n{node.process.log_tail()}"
            )
        try:
            if httpx.get(f"{node.url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    node.stop()
    raise ServiceError(f"node {node.name} was not ready within {timeout}s")


# Regions given to local nodes in turn, so a local mesh looks like the one it stands for.
LOCAL_REGIONS = ("eu-west", "ap-southeast", "ap-vn", "us-east", "sa-east", "af-south")


def start_nodes(
    services: BackingServices,
    token_keys: dict[str, str],
    *,
    count: int,
    data_dir: Path,
    ports: list[int] | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[LocalNode]:
    """`count` nodes named node-1.. with distinct regions and ports, started side by side."""
    nodes: list[LocalNode] = []
    try:
        for index in range(count):
            port = ports[index] if ports else free_port()
            name = f"node-{index + 1}"
            env = node_env(
                services,
                token_keys,
                name=name,
                port=port,
                data_dir=data_dir,
                extra={
                    "SFUMESH_REGION": LOCAL_REGIONS[index % len(LOCAL_REGIONS)],
                    **(extra_env or {}),
                },
            )
            process = ManagedProcess(
                name, [sys.executable, "-m", "node.cli", "node"], data_dir / f"{name}.log", env=env
            )
            nodes.append(LocalNode(name, f"http://127.0.0.1:{port}", process))
            process.start()
        for node in nodes:
            wait_ready(node)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def start_node(
    services: BackingServices,
    token_keys: dict[str, str],
    *,
    name: str,
    data_dir: Path,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> LocalNode:
    port = port or free_port()
    env = node_env(services, token_keys, name=name, port=port, data_dir=data_dir, extra=extra_env)
    process = ManagedProcess(
        name, [sys.executable, "-m", "node.cli", "node"], data_dir / f"{name}.log", env=env
    )
    node = LocalNode(name, f"http://127.0.0.1:{port}", process)
    process.start()
    try:
        wait_ready(node)
    except BaseException:
        # Ctrl-C or a failure while waiting: the caller has no handle yet, so stop it here.
        node.stop()
        raise
    return node
