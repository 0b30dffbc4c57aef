"""The backing services a node needs: Redis and the MongoDB-compatible store.

One code path for the node, `sfumesh demo` and the test fixtures: a URL that is given is used
as it is and nothing starts; a URL that is missing gets an embedded server with its own data
dir: `redis-server` on a free loopback port with a generated password, and the document
store (`nx-27017`, which has no authentication) on a Unix socket only its owner may open
(`node.runtime.store_server`). Data dirs are 0700, the children write under a umask of 077,
and `redis.conf` (it holds the password) is 0600 from its creation. Embedded children are
stopped by PID, and one that dies is reported through `dead()`/`watch()`, never ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from mesh.process import ManagedProcess, ServiceError, free_port, private_dir, private_file

log = logging.getLogger(__name__)


def redis_process(
    data_dir: Path, port: int, password: str, bind: str = "127.0.0.1"
) -> ManagedProcess:
    """An embedded redis-server (not started) on `bind`:`port`, with a password. `bind` is
    loopback except in the WAN lab (`node.lab.cluster`), where Redis is its own host and
    listens on that host's 198.18.x.y address inside the lab's private namespace."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (./scripts/setup installs it)")
    private_dir(data_dir)
    # The password goes in a file that is 0600 from its creation, not on the command line
    # where `ps` would show it.
    conf = private_file(
        data_dir / "redis.conf",
        f"port {port}\nbind {bind}\nprotected-mode yes\ndir {data_dir}\n"
        "appendonly yes\nsave 60 1\ndaemonize no\n"
        f"requirepass {password}\n",
    )
    return ManagedProcess("redis", [binary, str(conf)], data_dir / "redis.log")


#: a Unix socket's path must fit `sockaddr_un` (108 bytes with its NUL)
SOCKET_PATH_MAX = 100


def store_socket_path(data_dir: Path) -> Path:
    """Where the embedded store listens: in its data dir, or (a path too long for a Unix
    socket) in a fresh 0700 directory of its own under the temporary directory."""
    path = data_dir / "store.sock"
    if len(os.fsencode(path.resolve())) <= SOCKET_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="sfumesh-store-")) / "store.sock"


def store_uri(socket_path: Path) -> str:
    """The driver's URI for a store on a Unix socket (the path percent-encoded as the host)."""
    return f"mongodb://{quote(str(socket_path.resolve()), safe='')}/"


#: the lab's store port (its own host, so nothing else listens there)
STORE_LAB_PORT = 27017


def store_process(
    data_dir: Path, socket_path: Path | None = None, *, lab_tcp: str | None = None
) -> ManagedProcess:
    """The embedded store (not started) on a Unix socket, or, for the WAN lab only, on TCP
    at `lab_tcp` ("198.18.x.y:port", which `node.runtime.store_server` checks: the store
    has no authentication, and there only the lab's namespaces can reach it)."""
    private_dir(data_dir)
    if (socket_path is None) == (lab_tcp is None):
        raise ValueError("the store listens on a Unix socket or (in the lab) on TCP, one of them")
    where = (
        ["--socket", str(socket_path)] if socket_path is not None else ["--lab-tcp", str(lab_tcp)]
    )
    argv = [
        sys.executable,
        "-m",
        "node.runtime.store_server",
        *where,
        "--data-dir",
        str(data_dir / "db"),
        "--log-file",
        str(data_dir / "nx-27017.log"),
    ]
    return ManagedProcess("store", argv, data_dir / "store.out", env=dict(os.environ))


@dataclass
class BackingServices:
    """URLs of Redis and the store, plus the embedded children started to provide them."""

    redis_url: str
    mongodb_uri: str
    children: list[ManagedProcess] = field(default_factory=list)
    #: the embedded store's socket (None: no embedded store)
    store_socket: Path | None = None

    @classmethod
    def start(cls, redis_url: str, mongodb_uri: str, data_dir: Path) -> BackingServices:
        services = cls(redis_url, mongodb_uri)
        try:
            if not redis_url or not mongodb_uri:
                private_dir(data_dir)
            if not redis_url:
                port = free_port()
                password = secrets.token_urlsafe(24)
                child = redis_process(data_dir / "redis", port, password)
                services._launch(child)
                child.wait_port("127.0.0.1", port)
                services.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
            if not mongodb_uri:
                store_dir = private_dir(data_dir / "store")
                socket_path = services.store_socket = store_socket_path(store_dir)
                child = store_process(store_dir, socket_path)
                services._launch(child)
                child.wait_unix_socket(socket_path)
                services.mongodb_uri = store_uri(socket_path)
        except BaseException:
            services.stop()
            raise
        return services

    def _launch(self, child: ManagedProcess) -> None:
        child.start()
        self.children.append(child)

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
        socket_dir = self.store_socket.parent if self.store_socket is not None else None
        if socket_dir is not None and socket_dir.name.startswith("sfumesh-store-"):
            shutil.rmtree(socket_dir, ignore_errors=True)  # made by `store_socket_path`
