"""Real Redis deployments on loopback for the tests: a 3-primary Redis Cluster, and a
primary with a replica watched by three Sentinels. Every process is a `redis-server` started
and stopped by PID (ManagedProcess); configs holding passwords are 0600 files.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.process import ManagedProcess, ServiceError, free_port, private_dir, private_file

SERVICE = "sfumesh"


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (./scripts/setup installs it)")
    return binary


def _server(
    name: str, data_dir: Path, port: int, conf: str, *, sentinel: bool = False
) -> ManagedProcess:
    private_dir(data_dir)
    path = private_file(
        data_dir / ("sentinel.conf" if sentinel else "redis.conf"),
        f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {data_dir}\ndaemonize no\n{conf}",
    )
    argv = [_binary(), str(path), *(["--sentinel"] if sentinel else [])]
    process = ManagedProcess(name, argv, data_dir / "redis.log")
    process.start()
    process.wait_port("127.0.0.1", port)
    return process


def cli(port: int, password: str, *args: str, timeout: float = 60.0) -> str:
    """redis-cli against a loopback port (the password through the environment, not argv)."""
    result = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        env={"REDISCLI_AUTH": password, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(f"redis-cli {' '.join(args)}: {result.stderr or result.stdout}")
    return result.stdout


@dataclass
class RedisCluster:
    password: str
    ports: list[int]
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def start_cluster(data_dir: Path, primaries: int = 3) -> RedisCluster:
    """`primaries` cluster-mode redis-servers joined by `redis-cli --cluster create`, the
    16384 slots split among them; returns once every node reports cluster_state:ok."""
    password = secrets.token_urlsafe(18)
    cluster = RedisCluster(password, [free_port() for _ in range(primaries)])
    try:
        for index, port in enumerate(cluster.ports):
            conf = (
                "cluster-enabled yes\ncluster-config-file nodes.conf\n"
                "cluster-node-timeout 2000\nappendonly no\nsave ''\n"
                f"requirepass {password}\nmasterauth {password}\n"
            )
            cluster.processes.append(
                _server(f"redis-cluster-{index + 1}", data_dir / f"cluster-{port}", port, conf)
            )
        addresses = [f"127.0.0.1:{port}" for port in cluster.ports]
        cli(cluster.ports[0], password, "--cluster", "create", *addresses, "--cluster-yes")
        deadline = time.monotonic() + 30
        while not all(
            "cluster_state:ok" in cli(port, password, "cluster", "info") for port in cluster.ports
        ):
            if time.monotonic() > deadline:
                raise ServiceError("the Redis Cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelGroup:
    password: str
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    servers: dict[int, ManagedProcess] = field(default_factory=dict)
    sentinels: list[ManagedProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def primary(self) -> int:
        """The port the sentinels name as primary now."""
        for port in self.sentinel_ports:
            try:
                out = cli(port, "", "sentinel", "get-master-addr-by-name", SERVICE, timeout=5)
            except (ServiceError, subprocess.TimeoutExpired):
                continue
            lines = out.split()
            if len(lines) == 2:
                return int(lines[1])
        raise ServiceError("no sentinel names a primary")

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            process.stop()


def start_sentinel_group(data_dir: Path, *, down_after_ms: int = 1000) -> SentinelGroup:
    """A primary, one replica, three sentinels (quorum 2), all on loopback."""
    password = secrets.token_urlsafe(18)
    ports = [free_port() for _ in range(5)]
    group = SentinelGroup(password, ports[0], ports[1], ports[2:])
    auth = f"requirepass {password}\nmasterauth {password}\nappendonly no\nsave ''\n"
    try:
        for port in (group.primary_port, group.replica_port):
            replica = (
                ""
                if port == group.primary_port
                else (f"replicaof 127.0.0.1 {group.primary_port}\n")
            )
            group.servers[port] = _server(
                f"redis-{port}", data_dir / f"redis-{port}", port, auth + replica
            )
        for port in group.sentinel_ports:
            conf = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {group.primary_port} 2\n"
                f"sentinel auth-pass {SERVICE} {password}\n"
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            group.sentinels.append(
                _server(
                    f"sentinel-{port}", data_dir / f"sentinel-{port}", port, conf, sentinel=True
                )
            )
        deadline = time.monotonic() + 30
        while "master_link_status:up" not in cli(
            group.replica_port, password, "info", "replication"
        ):
            if time.monotonic() > deadline:
                raise ServiceError("the replica did not sync within 30 s")
            time.sleep(0.1)
        # Every sentinel must know the replica and the other sentinels before a failover.
        while not all(_sentinel_ready(port, group.replica_port) for port in group.sentinel_ports):
            if time.monotonic() > deadline:
                raise ServiceError("the sentinels did not discover each other within 30 s")
            time.sleep(0.2)
    except BaseException:
        group.stop()
        raise
    return group


def _sentinel_ready(port: int, replica_port: int) -> bool:
    out = cli(port, "", "sentinel", "master", SERVICE, timeout=5).split()
    fields = dict(zip(out[::2], out[1::2], strict=False))
    replicas = cli(port, "", "sentinel", "replicas", SERVICE, timeout=5)
    return int(fields.get("num-other-sentinels", "0")) >= 2 and str(replica_port) in replicas
