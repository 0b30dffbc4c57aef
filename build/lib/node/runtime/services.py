"""The backing services a node needs: Redis and the MongoDB-compatible store.

One code path for the node, `sfumesh demo` and the test fixtures: a URL that is given is used
as it is and nothing starts; a URL that is missing gets an embedded server (`redis-server`,
`nx-27017`) on a free loopback port with its own data dir. Embedded children are stopped by
PID, and one that dies is reported through `dead()`/`watch()`, never ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.process import ManagedProcess, ServiceError, free_port

log = logging.getLogger(__name__)


def _redis_process(data_dir: Path, port: int, password: str) -> ManagedProcess:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (./scripts/setup installs it)")
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "redis.conf"
    # The password goes in a 0600 file, not on the command line where `ps` would show it.
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {data_dir}\n"
        "appendonly yes\nsave 60 1\ndaemonize no\n"
        f"requirepass {password}\n"
    )
    conf.chmod(0o600)
    return ManagedProcess("redis", [binary, str(conf)], data_dir / "redis.log")


def _store_process(data_dir: Path, port: int) -> ManagedProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-c",
        "import sys; from nx_27017.nx_27017 import main; sys.exit(main())",
        "--data-dir",
        str(data_dir / "db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-file",
        str(data_dir / "nx-27017.log"),
        "--pid-file",
        str(data_dir / "nx-27017.pid"),
    ]
    return ManagedProcess("store", argv, data_dir / "store.out", env=dict(os.environ))


@dataclass
class BackingServices:
    """URLs of Redis and the store, plus the embedded children started to provide them."""

    redis_url: str
    mongodb_uri: str
    children: list[ManagedProcess] = field(default_factory=list)

    @classmethod
    def start(cls, redis_url: str, mongodb_uri: str, data_dir: Path) -> BackingServices:
        services = cls(redis_url, mongodb_uri)
        try:
            if not redis_url:
                port = free_port()
                password = secrets.token_urlsafe(24)
                child = _redis_process(data_dir / "redis", port, password)
                services._launch(child, port)
                services.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
            if not mongodb_uri:
                port = free_port()
                child = _store_process(data_dir / "store", port)
                services._launch(child, port)
                services.mongodb_uri = f"mongodb://127.0.0.1:{port}/"
        except BaseException:
            services.stop()
            raise
        return services

    def _launch(self, child: ManagedProcess, port: int) -> None:
        child.start()
        self.children.append(child)
        child.wait_port("127.0.0.1", port)

    def dead(self) -> list[ManagedProcess]:
        return [c for c in self.children if not c.stopping and c.exit_code() is not None]

    def check(self) -> None:
        for child in self.dead():
            raise ServiceError(f"embedded {child.death_report()}")

    async def watch(
        self, on_death: Callable[[ManagedProcess], Awaitable[None]], interval: float = 0.5
    ) -> None:
        """Until cancelled: report the first embedded child that dies, then return."""
        while True:
            for child in self.dead():
                log.error(
                    "service.died",
                    extra={
                        "service": child.name,
                        "pid": child.pid,
                        "code": child.exit_code(),
                        "log_tail": child.log_tail(),
                    },
                )
                await on_death(child)
                return
            await asyncio.sleep(interval)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
