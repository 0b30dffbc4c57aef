"""Child processes supervised by PID: start, wait for a port, report death, stop.

The Serf agent (mesh/agent.py) and the node's embedded services (node/runtime/services.py)
are both such children; this is the one implementation, kept in mesh/ because the mesh
supervises its agent without knowing anything of the node.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import signal
import socket
import subprocess
import time
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


def is_loopback(address: str) -> bool:
    """Whether a "host:port" (or "[v6]:port") address is reachable from this machine only."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, which may resolve anywhere


def port_open(host: str, port: int) -> bool:
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
            if port_open(host, port):
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
