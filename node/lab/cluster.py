"""A running sfumesh cluster inside the WAN lab: Redis, the store and the nodes on their hosts.

    with LabCluster.from_file(None, data_dir) as cluster:   # the default topology
        cluster.urls                     # {"sg-node": "http://198.18.0.2:8080", ...}
        cluster.request("eu-peer", "GET", cluster.urls["sg-node"] + "/api/ping")
        cluster.run("vn-peer", lambda: participant_coroutine(...))  # an asyncio program
        cluster.serf_members("sg-node"), cluster.serf_rtt_ms("sg-node", "hcm-node")

`sfumesh lab`, the tests and `bench geo` use it. It reuses the local launcher
(`node.local.launch`: the node's environment, Serf settings and cluster secrets) and the
embedded services (`node.runtime.services`), each process started through `nsenter` into
its host's namespace (`Lab.command`), so every byte between hosts crosses the emulator:

* Redis on the `redis` host, bound to its 198.18.x.y address, with a generated password.
* The store on the `store` host over TCP at its 198.18.x.y address (the store's lab-only
  mode, `--lab-tcp`: a Unix socket cannot cross the emulated links).
* On each `node` host, a node listening on its 198.18.x.y address with its own Serf agent
  (bind on that address, RPC on the host's loopback), gossip encrypted, RPC auth on, the
  relay key shared, every agent joining the first node's over the emulated links; the media
  host address is the host's 198.18.x.y address and its region the host's region.

Readiness checks run inside the hosts (`Lab.call`), since the lab's addresses are reachable
only from its namespaces. `stop` ends the nodes, the services and the lab, by PID; a state
file (`lab.json`, 0600) in the data dir names the hosts' namespace holders while the lab runs,
for `sfumesh lab shell`, and is removed on stop. Nothing is written outside the data dir.

node.lab sits above node.local in the layers (it uses the local launcher, never the reverse).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import httpx

from mesh.process import ManagedProcess, ServiceError, private_dir, private_file
from mesh.serf import Member, SerfClient
from mesh.vivaldi import Coordinate, estimate_rtt
from node.config import new_key
from node.lab.namespaces import Lab, LabError
from node.lab.topology import Host, Role, read_topology
from node.local.launch import ClusterSecrets, LocalNode, spawn_node, wait_ready
from node.runtime.services import (
    STORE_LAB_PORT,
    BackingServices,
    redis_process,
    store_process,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: every host has a namespace of its own, so the ports can be fixed
NODE_PORT: Final = 8080
SERF_PORT: Final = 7946
SERF_RPC_ADDR: Final = "127.0.0.1:7373"
REDIS_PORT: Final = 6379
#: the file naming a running lab's namespaces, in its data dir
STATE_FILE: Final = "lab.json"
#: how long a node may take to answer /readyz (two cores shared by many processes)
NODE_READY_TIMEOUT_S: Final = 90.0
#: how long a node may take to stop gracefully (drain, Serf leave across the emulated links)
NODE_STOP_TIMEOUT_S: Final = 30.0


@dataclass
class LabNode:
    """A node of the lab: its host, URL, process and when it was started (monotonic)."""

    host: str
    url: str
    local: LocalNode
    started_at: float
    #: seconds from its start until it answered /readyz (None: not yet)
    ready_s: float | None = None

    @property
    def name(self) -> str:
        return self.local.name


@dataclass(frozen=True)
class Convergence:
    """How long the mesh took to form: per node, from its start to seeing every node alive
    in Serf (`join_s`); from the last node's start until every node saw every other alive
    (`converged_s`); and from the moment every agent first answered its RPC until then
    (`after_agents_s`: Serf's own part, without the processes' start-up)."""

    join_s: Mapping[str, float]
    converged_s: float
    after_agents_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "join_s": dict(self.join_s),
            "converged_s": self.converged_s,
            "after_agents_s": self.after_agents_s,
        }


class LabCluster:
    """The topology's hosts (a `Lab`), with Redis, the store and the nodes running on them.
    A context manager; `stop` is idempotent and leaves only files inside `data_dir`."""

    def __init__(
        self,
        topology_text: str,
        source: str,
        data_dir: Path,
        *,
        realtime: bool = True,
        node_env: Mapping[str, str] | None = None,
    ) -> None:
        # the links outlive the nodes: a terminal's Ctrl-C reaches only this process, which
        # stops the nodes (their Serf leave and Redis deregistration cross the links) first
        self.lab = Lab(topology_text, source, realtime=realtime, own_session=True)
        self._source = source
        self.topology = self.lab.topology
        self.data_dir = data_dir
        self._node_env = dict(node_env or {})
        self.services: BackingServices | None = None
        self.nodes: dict[str, LabNode] = {}
        self.secrets: ClusterSecrets | None = None
        self._state_path: Path | None = None
        redis = self.topology.hosts_with(Role.REDIS)
        store = self.topology.hosts_with(Role.STORE)
        nodes = self.topology.hosts_with(Role.NODE)
        if nodes and (len(redis) != 1 or len(store) != 1):
            raise LabError(
                f"{source}: nodes need exactly one `redis` and one `store` host "
                f"(found {len(redis)} and {len(store)})"
            )
        self._redis_host: Host | None = redis[0] if redis else None
        self._store_host: Host | None = store[0] if store else None
        self._node_hosts = nodes

    @classmethod
    def from_file(cls, path: Path | str | None, data_dir: Path, **kwargs: Any) -> LabCluster:
        """A cluster of a topology file (None: the default topology)."""
        text, source = read_topology(path)
        return cls(text, source, data_dir, **kwargs)

    def __enter__(self) -> LabCluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # -- life cycle -------------------------------------------------------------------

    @property
    def urls(self) -> dict[str, str]:
        """Each node host's URL (http://198.18.x.y:8080), reachable from the lab's hosts."""
        return {host: node.url for host, node in self.nodes.items()}

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def start(self) -> None:
        """Build the hosts, start the services and the nodes, wait until each node is ready
        (not until the mesh has converged: `wait_converged`). On any failure everything
        started is stopped and the error raised."""
        private_dir(self.data_dir, tighten=False)
        self.lab.start()
        try:
            self._write_state()
            if self._node_hosts:
                self.services = self._start_services()
                self._start_nodes(self.services)
                self._write_state()
        except BaseException:
            self.stop()
            raise

    def _start_services(self) -> BackingServices:
        assert self._redis_host is not None and self._store_host is not None
        services = BackingServices("", "")
        try:
            redis_address = str(self._redis_host.address)
            password = secrets.token_urlsafe(24)
            redis = redis_process(self.data_dir / "redis", REDIS_PORT, password, bind=redis_address)
            self._launch(services, redis, self._redis_host.name)
            store_address = str(self._store_host.address)
            store = store_process(
                self.data_dir / "store", lab_tcp=f"{store_address}:{STORE_LAB_PORT}"
            )
            self._launch(services, store, self._store_host.name)
            # both from their own hosts: the lab's addresses exist only in its namespaces
            self.lab.call(self._redis_host.name, lambda: redis.wait_port(redis_address, REDIS_PORT))
            self.lab.call(
                self._store_host.name, lambda: store.wait_port(store_address, STORE_LAB_PORT)
            )
        except BaseException:
            services.stop()
            raise
        services.redis_url = f"redis://:{password}@{redis_address}:{REDIS_PORT}/0"
        services.mongodb_uri = f"mongodb://{store_address}:{STORE_LAB_PORT}/"
        return services

    def _launch(self, services: BackingServices, child: ManagedProcess, host: str) -> None:
        child.argv = self.lab.command(host, child.argv)
        child.start()
        services.children.append(child)

    def _start_nodes(self, services: BackingServices) -> None:
        self.secrets = cluster = ClusterSecrets.new()
        token_keys = {"lab": new_key()}
        first_bind: list[str] = []
        node_dir = private_dir(self.data_dir / "nodes")
        for host in self._node_hosts:
            address = str(host.address)
            serf = cluster.serf(f"{address}:{SERF_PORT}", SERF_RPC_ADDR)
            extra = {
                "SFUMESH_REGION": host.region,
                "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps([address]),
                **self._node_env,
            }
            local = spawn_node(
                services,
                token_keys,
                name=host.name,
                port=NODE_PORT,
                data_dir=node_dir,
                extra_env=extra,
                serf=serf,
                join=list(first_bind),
                host=address,
                wrap=functools.partial(self.lab.command, host.name),
            )
            self.nodes[host.name] = LabNode(host.name, local.url, local, time.monotonic())
            if not first_bind:
                first_bind.append(serf.bind)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Every node answering /readyz (checked inside its host), side by side so each
        node's `ready_s` is its own: a far node's start-up pays Redis and store round trips."""
        failures: list[BaseException] = []

        def wait(name: str, node: LabNode) -> None:
            try:
                self.lab.call(name, functools.partial(wait_ready, node.local, NODE_READY_TIMEOUT_S))
                node.ready_s = time.monotonic() - node.started_at
            except BaseException as error:  # raised below, in the caller's thread
                failures.append(error)

        waiters = [
            threading.Thread(target=wait, args=(name, node), name=f"lab-ready-{name}")
            for name, node in self.nodes.items()
        ]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
        if failures:
            raise failures[0]

    def stop(self) -> None:
        """End the nodes, the services and the lab (by PID) and remove the state file."""
        nodes, self.nodes = self.nodes, {}
        # side by side: each takes seconds (it drains, its agent leaves over the WAN), more
        # on a loaded machine: a graceful stop gets NODE_STOP_TIMEOUT_S before it is killed
        stoppers = [
            threading.Thread(
                target=node.local.stop, args=(NODE_STOP_TIMEOUT_S,), name=f"lab-stop-{host}"
            )
            for host, node in nodes.items()
        ]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        services, self.services = self.services, None
        if services is not None:
            services.stop()
        self.lab.stop()
        if self._state_path is not None:
            self._state_path.unlink(missing_ok=True)
            self._state_path = None

    def _write_state(self) -> None:
        """The running lab's hosts (their namespace holders' PIDs and namespace ids) and node
        URLs, 0600, for `sfumesh lab shell`; no secrets."""
        hosts = {}
        for key, pid in self.lab.pids.items():
            if key.startswith("host:"):
                name = key.removeprefix("host:")
                hosts[name] = {
                    "pid": pid,
                    "netns": os.readlink(f"/proc/{pid}/ns/net"),
                    "address": str(self.lab.address(name)),
                }
        state = {"pid": os.getpid(), "source": self._source, "hosts": hosts}
        state["nodes"] = self.urls
        self._state_path = private_file(self.state_path, json.dumps(state, indent=2) + "\n")

    def dead(self) -> list[ManagedProcess]:
        """Lab processes (services, nodes) that exited on their own."""
        dead = self.services.dead() if self.services is not None else []
        dead += [
            n.local.process
            for n in self.nodes.values()
            if not n.local.process.stopping and n.local.process.exit_code() is not None
        ]
        return dead

    # -- using it ---------------------------------------------------------------------

    def call(self, host: str, function: Callable[[], T]) -> T:
        """`function()` inside `host` (see `Lab.call`)."""
        return self.lab.call(host, function)

    def run(self, host: str, program: Callable[[], Awaitable[T]]) -> T:
        """An asyncio program (a participant, a client) run to its end inside `host`: its
        own event loop on a thread in the host's namespace."""

        async def main() -> T:
            return await program()

        def run() -> T:
            return asyncio.run(main())

        return self.lab.call(host, run)

    def request(self, host: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP request made from `host` (through the emulated path to the node)."""
        kwargs.setdefault("timeout", 30.0)

        def request() -> httpx.Response:
            return httpx.request(method, url, **kwargs)

        return self.lab.call(host, request)

    def serf(self, node_host: str, program: Callable[[SerfClient], Awaitable[T]]) -> T:
        """`program(client)` with an RPC client of `node_host`'s Serf agent (in its host)."""
        if self.secrets is None:
            raise LabError("no nodes running")
        auth = self.secrets.rpc_auth

        async def main() -> T:
            async with SerfClient(SERF_RPC_ADDR, auth, reconnect=False, timeout=5.0) as client:
                return await program(client)

        def run() -> T:
            return asyncio.run(main())

        return self.lab.call(node_host, run)

    def serf_members(self, node_host: str) -> list[Member]:
        """The members `node_host`'s agent sees."""

        async def members(client: SerfClient) -> list[Member]:
            return await client.members()

        return self.serf(node_host, members)

    def serf_rtt_ms(self, a: str, b: str, *, seen_from: str | None = None) -> float | None:
        """Serf's RTT estimate between nodes `a` and `b` (what `serf rtt a b` prints), from
        the coordinates `seen_from`'s agent holds (default `a`); None before both exist."""

        async def rtt(client: SerfClient) -> float | None:
            raw_a = await client.get_coordinate(a)
            raw_b = await client.get_coordinate(b)
            if raw_a is None or raw_b is None:
                return None
            return 1000.0 * estimate_rtt(Coordinate.from_rpc(raw_a), Coordinate.from_rpc(raw_b))

        return self.serf(seen_from or a, rtt)

    def wait_converged(self, timeout: float = 60.0, interval: float = 0.05) -> Convergence:
        """Until every node's agent sees every node `alive`; how long that took (see
        `Convergence`). Raises ServiceError on timeout."""
        names = set(self.nodes)
        seen_at: dict[str, float] = {}
        answered_at: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen_at) < len(names):
            for host in self.nodes:
                if host in seen_at:
                    continue
                with contextlib.suppress(OSError, RuntimeError):
                    members = self.serf_members(host)
                    answered_at.setdefault(host, time.monotonic())
                    alive = {m.name for m in members if m.status == "alive"}
                    if names <= alive:
                        seen_at[host] = time.monotonic()
            if time.monotonic() > deadline:
                missing = sorted(names - set(seen_at))
                raise ServiceError(f"Serf did not converge within {timeout:g} s: {missing}")
            time.sleep(interval)
        join = {host: seen_at[host] - node.started_at for host, node in self.nodes.items()}
        last_start = max(node.started_at for node in self.nodes.values())
        done = max(seen_at.values())
        return Convergence(join, done - last_start, done - max(answered_at.values()))


def running_hosts(data_dir: Path) -> dict[str, int]:
    """The hosts of the lab running with `data_dir` and their namespace holders' PIDs, read
    from its state file; LabError if there is none, or it is stale (a holder gone, or its PID
    now someone else's: the namespace id must still match)."""
    path = data_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab is running with data dir {data_dir} (no {STATE_FILE})") from None
    except (OSError, json.JSONDecodeError) as error:
        raise LabError(f"cannot read {path}: {error}") from error
    hosts: dict[str, int] = {}
    for name, host in state.get("hosts", {}).items():
        pid = int(host["pid"])
        try:
            current = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            current = None
        if current != host["netns"]:
            raise LabError(f"the lab of {path} is no longer running (host {name} is gone)")
        hosts[name] = pid
    return hosts
