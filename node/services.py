"""The backing services a node needs: Redis and the MongoDB-compatible store.

One code path for the node, `sfumesh demo` and the test fixtures: a URL that is given is used
as it is and nothing starts; a URL that is missing gets an embedded server (`redis-server`,
`nx-27017`) on a free loopback port with its own data dir. Embedded children are stopped by
PID, and one that dies is reported through `dead()`/`watch()`, never ignored.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A backing service could not start or has died."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the forked child before exec.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class ManagedProcess:
    """A child process we started; stopped by its PID, never by name."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    #: ask the kernel to SIGTERM the child when this process dies, even by `kill -9` (Linux;
    #: call `start` from the main thread: the signal follows the thread that forked)
    die_with_parent: bool = False
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        self.stopping = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        log.info("service.started", extra={"service": self.name, "pid": self.pid})

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def death_report(self) -> str:
        return f"{self.name} (pid {self.pid}) died with code {self.exit_code()}:\n{self.log_tail()}"

    def wait_port(self, host: str, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} while starting:\n{self.log_tail()}"
                )
            if _port_open(host, port):
                return
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} did not listen on {host}:{port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.stopping = True
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("service.kill", extra={"service": self.name, "pid": self.pid})
            self.popen.kill()
            self.popen.wait(timeout)
        log.info("service.stopped", extra={"service": self.name, "pid": self.pid})


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
