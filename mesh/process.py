"""Child processes supervised by PID: start, wait for a port, report death, stop.

The Serf agent (mesh/agent.py) and the node's embedded services (node/runtime/services.py)
are both such children; this is the one implementation, kept in mesh/ because the mesh
supervises its agent without knowing anything of the node.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
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


#: the umask of every child started here: what they write (databases, snapshots, logs) is
#: their owner's alone
PRIVATE_UMASK = 0o077


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """`path` as a directory only its owner may enter: made 0700 if missing; one that exists
    is tightened to 0700 too, unless `tighten` is False (a directory an operator named, which
    may be shared on purpose: never chmod someone's /tmp)."""
    existed = path.is_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if tighten or not existed:
        path.chmod(0o700)  # mkdir's mode is masked by the umask
    return path


def private_file(path: Path, text: str) -> Path:
    """Write `text` to a file that is 0600 from its creation (never readable by others for a
    moment, as a write then chmod would be), replacing any file there."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)
    return path


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


def unix_socket_open(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            sock.connect(str(path))
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
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
                umask=PRIVATE_UMASK,
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
        self._wait(lambda: port_open(host, port), f"{host}:{port}", timeout)

    def wait_unix_socket(self, path: Path, timeout: float = 20.0) -> None:
        self._wait(lambda: unix_socket_open(path), str(path), timeout)

    def _wait(self, listening: Callable[[], bool], where: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} while starting:\n{self.log_tail()}"
                )
            if listening():
                return
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} did not listen on {where} within {timeout}s")

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
