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
                # its bus port given: the default (port + 10000) may not exist
                f"cluster-enabled yes\ncluster-port {free_port()}\n"
                "cluster-config-file nodes.conf\n"
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
    server_ports: list[int]  # the first started as primary, the others as its replicas
    sentinel_ports: list[int]
    servers: dict[int, ManagedProcess] = field(default_factory=dict)
    sentinels: list[ManagedProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def primary(self) -> int:
        """The port the sentinels name as primary now (asked of the first that answers)."""
        for port in self.sentinel_ports:
            try:
                out = cli(port, "", "sentinel", "get-master-addr-by-name", SERVICE, timeout=5)
            except (ServiceError, subprocess.TimeoutExpired):
                continue
            lines = out.split()
            if len(lines) == 2:
                return int(lines[1])
        raise ServiceError("no sentinel names a primary")

    def kill(self, port: int) -> None:
        """SIGKILL one server (by its PID), as a crash would."""
        popen = self.servers[port].popen
        assert popen is not None
        popen.kill()
        popen.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed server again, empty: the sentinels make it a replica of the
        primary they promoted."""
        process = self.servers[port]
        process.start()
        process.wait_port("127.0.0.1", port)

    def wait_new_primary(self, old: int, within_s: float = 30.0) -> int:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                port = self.primary()
            except ServiceError:
                port = old
            if port != old and "role:master" in cli(port, self.password, "info", "replication"):
                return port
            time.sleep(0.1)
        raise ServiceError(f"no replica was promoted within {within_s} s")

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            process.stop()


def start_sentinel_group(
    data_dir: Path, *, replicas: int = 2, down_after_ms: int = 1000
) -> SentinelGroup:
    """A primary and `replicas` replicas, watched by three sentinels (quorum 2), on loopback.
    Two replicas, so that once one is promoted the other still acknowledges writes (WAIT)."""
    password = secrets.token_urlsafe(18)
    ports = [free_port() for _ in range(4 + replicas)]
    group = SentinelGroup(password, ports[: 1 + replicas], ports[1 + replicas :])
    primary = group.server_ports[0]
    auth = f"requirepass {password}\nmasterauth {password}\nappendonly no\nsave ''\n"
    try:
        for port in group.server_ports:
            follow = "" if port == primary else f"replicaof 127.0.0.1 {primary}\n"
            group.servers[port] = _server(
                f"redis-{port}", data_dir / f"redis-{port}", port, auth + follow
            )
        for port in group.sentinel_ports:
            conf = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel auth-pass {SERVICE} {password}\n"
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} {replicas}\n"
            )
            group.sentinels.append(
                _server(
                    f"sentinel-{port}", data_dir / f"sentinel-{port}", port, conf, sentinel=True
                )
            )
        deadline = time.monotonic() + 30
        for port in group.server_ports[1:]:
            while "master_link_status:up" not in cli(port, password, "info", "replication"):
                if time.monotonic() > deadline:
                    raise ServiceError("the replicas did not sync within 30 s")
                time.sleep(0.1)
        # Every sentinel must know the replicas and the other sentinels before a failover.
        while not all(
            _sentinel_ready(port, group.server_ports[1:]) for port in group.sentinel_ports
        ):
            if time.monotonic() > deadline:
                raise ServiceError("the sentinels did not discover each other within 30 s")
            time.sleep(0.2)
    except BaseException:
        group.stop()
        raise
    return group


def _sentinel_ready(port: int, replica_ports: list[int]) -> bool:
    out = cli(port, "", "sentinel", "master", SERVICE, timeout=5).split()
    fields = dict(zip(out[::2], out[1::2], strict=False))
    known = cli(port, "", "sentinel", "replicas", SERVICE, timeout=5)
    return int(fields.get("num-other-sentinels", "0")) >= 2 and all(
        str(replica) in known for replica in replica_ports
    )
