"""Node processes on this machine, for `sfumesh demo`, benchmarks and multi-process tests."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from mesh.agent import serf_keygen
from mesh.process import ManagedProcess, ServiceError, free_port
from node.config import new_key
from node.runtime.services import BackingServices


@dataclass
class LocalNode:
    name: str
    url: str
    process: ManagedProcess
    #: the node's own Serf agent (None when started without the mesh)
    serf: SerfLaunch | None = None

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout)


def node_env(
    services: BackingServices,
    token_keys: dict[str, str],
    *,
    name: str,
    port: int,
    data_dir: Path,
    extra: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": services.redis_url,
            "MONGODB_URI": services.mongodb_uri,
            "SFUMESH_TOKEN_KEYS": json.dumps(token_keys),
            "SFUMESH_TOKEN_SIGNING_KEY_ID": next(iter(token_keys)),
            "SFUMESH_NODE_NAME": name,
            "SFUMESH_HOST": host,
            "SFUMESH_PORT": str(port),
            "SFUMESH_DATA_DIR": str(data_dir),
        }
    )
    # Local nodes (demo, benches, tests) serve browsers and peers on this machine, whose
    # candidates are loopback or private: allowed here, explicitly (off by default), unless
    # the caller's environment says otherwise.
    env.setdefault("SFUMESH_MEDIA_ALLOW_PRIVATE_CANDIDATES", "true")
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


@dataclass(frozen=True)
class SerfLaunch:
    """Where a local node's Serf agent listens, and the cluster's secrets."""

    bind: str
    rpc_addr: str
    rpc_auth: str
    encrypt_key: str
    #: the cluster's relay key (every relay signalling message is sealed with it)
    relay_key: str

    def env(self, join: list[str]) -> dict[str, str]:
        return {
            "SFUMESH_SERF_MODE": "own",
            "SFUMESH_SERF_BIND": self.bind,
            "SFUMESH_SERF_RPC_ADDR": self.rpc_addr,
            "SFUMESH_SERF_RPC_AUTH": self.rpc_auth,
            "SFUMESH_SERF_ENCRYPT_KEY": self.encrypt_key,
            "SFUMESH_RELAY_KEY": self.relay_key,
            "SFUMESH_SERF_JOIN": json.dumps(join),
        }


@dataclass(frozen=True)
class ClusterSecrets:
    """What the agents of one cluster share, made fresh for it: Serf's RPC auth token, the
    gossip encryption key, the relay key."""

    rpc_auth: str
    encrypt_key: str
    relay_key: str

    @classmethod
    def new(cls) -> ClusterSecrets:
        return cls(secrets.token_urlsafe(24), serf_keygen(), new_key())

    def serf(self, bind: str, rpc_addr: str) -> SerfLaunch:
        """One agent of this cluster, at `bind` with its RPC at `rpc_addr`."""
        return SerfLaunch(bind, rpc_addr, self.rpc_auth, self.encrypt_key, self.relay_key)


def local_serf(rpc_auth: str, encrypt_key: str, relay_key: str) -> SerfLaunch:
    """Free loopback ports for one more agent of a local cluster."""
    return SerfLaunch(
        f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", rpc_auth, encrypt_key, relay_key
    )


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
    mesh: bool = True,
) -> list[LocalNode]:
    """`count` nodes named node-1.. with distinct regions and ports, started side by side;
    with `mesh`, each with its own Serf agent (gossip encrypted, RPC auth on), all joined,
    relay signalling sealed with one relay key made for this cluster."""
    nodes: list[LocalNode] = []
    cluster = ClusterSecrets.new()
    first_bind: list[str] = []
    try:
        for index in range(count):
            port = ports[index] if ports else free_port()
            name = f"node-{index + 1}"
            serf = (
                local_serf(cluster.rpc_auth, cluster.encrypt_key, cluster.relay_key)
                if mesh
                else None
            )
            region = {"SFUMESH_REGION": LOCAL_REGIONS[index % len(LOCAL_REGIONS)]}
            node = spawn_node(
                services,
                token_keys,
                name=name,
                port=port,
                data_dir=data_dir,
                extra_env={**region, **(extra_env or {})},
                serf=serf,
                join=list(first_bind),
            )
            nodes.append(node)
            if serf is not None and not first_bind:
                first_bind.append(serf.bind)
        for node in nodes:
            wait_ready(node)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


#: how a node's command line is run: as it is, or wrapped (the lab: `nsenter` into a host)
Wrap = Callable[[Sequence[str]], list[str]]


def spawn_node(
    services: BackingServices,
    token_keys: dict[str, str],
    *,
    name: str,
    port: int,
    data_dir: Path,
    extra_env: dict[str, str] | None,
    serf: SerfLaunch | None,
    join: list[str] | None,
    host: str = "127.0.0.1",
    wrap: Wrap | None = None,
) -> LocalNode:
    """Start one node process listening on `host`:`port` (not waiting for it); `wrap` turns
    its command line into the one run (the WAN lab runs it inside a host's namespace)."""
    serf_env = serf.env(join or []) if serf else {"SFUMESH_SERF_MODE": "off"}
    env = node_env(
        services,
        token_keys,
        name=name,
        port=port,
        data_dir=data_dir,
        extra={**serf_env, **(extra_env or {})},
        host=host,
    )
    argv = [sys.executable, "-m", "node.cli", "node"]
    process = ManagedProcess(name, wrap(argv) if wrap else argv, data_dir / f"{name}.log", env=env)
    node = LocalNode(name, f"http://{host}:{port}", process, serf)
    process.start()
    return node


def start_node(
    services: BackingServices,
    token_keys: dict[str, str],
    *,
    name: str,
    data_dir: Path,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    serf: SerfLaunch | None = None,
    join: list[str] | None = None,
) -> LocalNode:
    """One node; with `serf`, beside its own agent (joining `join`), else without a mesh."""
    node = spawn_node(
        services,
        token_keys,
        name=name,
        port=port or free_port(),
        data_dir=data_dir,
        extra_env=extra_env,
        serf=serf,
        join=join,
    )
    try:
        wait_ready(node)
    except BaseException:
        # Ctrl-C or a failure while waiting: the caller has no handle yet, so stop it here.
        node.stop()
        raise
    return node
