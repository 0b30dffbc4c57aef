"""A lab: one network namespace per host, joined by the emulator process, torn down by PID.

    with Lab(topology_text) as lab:        # or Lab.from_file(path)
        proc = lab.run("sg-node", ["sfumesh", "node", ...])   # a process inside a host
        sock = lab.socket("eu-peer", socket.SOCK_DGRAM)       # a socket inside a host
        lab.address("sg-node")                                # its 198.18.x.y
        lab.stats()                                           # the emulator's ground truth
        lab.samples("a->b")                                   # its recent delays on a link

Each host's namespace is held by a `sleep` started through `unshare --net`; the emulator
(`python -m node.lab.emulator`) gives each its TUN device. Everything the lab starts is a
child it knows by PID; if the lab dies, the kernel kills the holders (`setpriv
--pdeathsig`: start a lab from a thread that outlives it, such as the main thread, since
the signal follows the starting thread) and the emulator sees the end of its input and
exits. `stop` ends them all (the emulator first, asked, then by signal) and waits for
them: the namespaces vanish with their last process, the TUN devices with the
emulator's file descriptors, and the lab writes no files. Ctrl-C reaches every child of the
terminal's process group at once and `stop` (run by `with`) collects them; with
`own_session` the holders and the emulator are out of the terminal's reach (a session of their
own) and only `stop` ends them, after whatever ran in the hosts, whose goodbyes (a Serf leave,
a node deregistering in Redis) still cross the links: `LabCluster` does so. Killed outright,
the lab still takes them along (pdeathsig; the emulator's input ends).

The lab builds only inside a private network namespace made by sfumesh (marker
SFUMESH_PRIVATE_NETNS=1 and not the init namespace; `./scripts/test` and the CLI make one),
so not even the emulator's devices, before they move, ever appear on the host. The check is
the same as node.local.netns's (written when node.lab and node.local were independent
layers; node.lab now sits above node.local and the two could share it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, TypeVar

from node.lab import kernel
from node.lab.topology import Topology, parse_topology, read_topology
from node.local.netns import MARKER_ENV, in_private_netns, namespace_id

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how long the emulator may take to set up its devices
READY_TIMEOUT_S: Final = 30.0
#: how long a child may take to exit once asked, before it is killed
STOP_TIMEOUT_S: Final = 3.0
_CAP_SYS_ADMIN: Final = 21


class LabError(RuntimeError):
    """The lab cannot be built (or a host, or the emulator, failed)."""


def _has_cap_sys_admin() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return os.geteuid() == 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    return os.geteuid() == 0


def namespace_problem() -> str | None:
    """Why host namespaces cannot be made here, or None if they can."""
    if sys.platform != "linux":
        return "the lab needs Linux (network namespaces and TUN devices)"
    if not in_private_netns():
        return (
            "refusing to build the lab outside a private network namespace made by sfumesh "
            f"({MARKER_ENV}=1; `sfumesh lab` and ./scripts/test make one)"
        )
    if not _has_cap_sys_admin():
        return (
            "cannot create network namespaces: no CAP_SYS_ADMIN (run as root, or where "
            "unprivileged user namespaces are allowed, so `unshare --map-root-user` works)"
        )
    tools = ("ip", "nsenter", "unshare", "setpriv", "sleep")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (Debian: iproute2, util-linux)"
    if not os.path.exists(kernel.TUN_PATH):
        return f"no {kernel.TUN_PATH} (the tun module)"
    return None


#: a host's namespace: held by a `sleep` that unshared it, killed by the kernel if the lab's
#: thread that started it dies (no preexec_fn: it is unsafe once threads run)
HOLDER: Final = ("setpriv", "--pdeathsig", "KILL", "unshare", "--net", "sleep", "infinity")
#: how long `unshare` may take to make a namespace
HOLDER_TIMEOUT_S: Final = 10.0


def _wait_unshared(holder: subprocess.Popen[bytes], own: str | None) -> None:
    """Until the holder is in a namespace of its own (or raise LabError)."""
    deadline = time.monotonic() + HOLDER_TIMEOUT_S
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            error = holder.stderr.read().decode(errors="replace") if holder.stderr else ""
            raise LabError(f"cannot create a host namespace: {error.strip() or holder.returncode}")
        current = namespace_id(str(holder.pid))
        if current is not None and current != own:
            return
        time.sleep(0.005)
    raise LabError(f"no host namespace after {HOLDER_TIMEOUT_S:g} s")


class Lab:
    """The hosts of a topology in their namespaces, joined by the emulator. A context
    manager (`start` on enter, `stop` on exit); `stop` is idempotent."""

    def __init__(
        self,
        topology_text: str,
        source: str = "<topology>",
        *,
        realtime: bool = False,
        own_session: bool = False,
        check: Callable[[], str | None] = namespace_problem,
    ) -> None:
        self.topology: Topology = parse_topology(topology_text, source)
        self._text = topology_text
        self._source = source
        self._realtime = realtime
        self._own_session = own_session
        self._check = check
        self._holders: dict[str, subprocess.Popen[bytes]] = {}
        self._emulator: subprocess.Popen[str] | None = None
        self._processes: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self.devices: dict[str, str] = {}
        self.realtime = False

    @classmethod
    def from_file(cls, path: Path | str | None = None, **kwargs: Any) -> Lab:
        """A lab of a topology file (None: the default topology)."""
        text, source = read_topology(path)
        return cls(text, source, **kwargs)

    # -- life cycle -------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Build the namespaces and start the emulator; on any failure tear down what was
        made and raise LabError."""
        problem = self._check()
        if problem is not None:
            raise LabError(problem)
        try:
            own = namespace_id("self")
            for name in self.topology.hosts:
                self._holders[name] = subprocess.Popen(
                    HOLDER,
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=self._own_session,
                )
            for holder in self._holders.values():
                _wait_unshared(holder, own)
                if holder.stderr is not None:
                    holder.stderr.close()
            self._start_emulator()
        except BaseException as error:
            self.stop()
            if isinstance(error, subprocess.SubprocessError | OSError):
                raise LabError(f"cannot create the host namespaces: {error}") from error
            raise

    def _start_emulator(self) -> None:
        self._emulator = subprocess.Popen(
            [sys.executable, "-m", "node.lab.emulator"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=self._own_session,
        )
        config = {
            "topology": self._text,
            "source": self._source,
            "namespaces": {name: p.pid for name, p in self._holders.items()},
            "realtime": self._realtime,
        }
        reply = self._ask(config, timeout=READY_TIMEOUT_S)
        if "ready" not in reply:
            raise LabError(f"the emulator failed: {reply.get('error', reply)}")
        self.devices = dict(reply["ready"]["devices"])
        self.realtime = bool(reply["ready"]["realtime"])

    def _ask(self, message: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        emulator = self._emulator
        if emulator is None or emulator.stdin is None or emulator.stdout is None:
            raise LabError("the emulator is not running")
        out: IO[str] = emulator.stdout
        with self._lock:
            try:
                emulator.stdin.write(json.dumps(message) + "\n")
                emulator.stdin.flush()
            except BrokenPipeError:
                raise LabError(f"the emulator exited ({emulator.poll()})") from None
            # one line per question, so nothing waits in `out`'s buffer between questions
            readable, _, _ = select.select([out], [], [], timeout)
            if not readable:
                raise LabError(f"the emulator did not answer within {timeout:g} s")
            answer = out.readline()
        if not answer:
            raise LabError(f"the emulator exited ({emulator.wait()})")
        reply: dict[str, Any] = json.loads(answer)
        return reply

    def stop(self) -> None:
        """End every process the lab started (by PID) and wait for them."""
        emulator, self._emulator = self._emulator, None
        if emulator is not None:
            with contextlib.suppress(OSError, ValueError):
                if emulator.stdin is not None:
                    emulator.stdin.write('{"cmd": "quit"}\n')
                    emulator.stdin.close()
            _end(emulator)
            if emulator.stdout is not None:
                emulator.stdout.close()
        processes, self._processes = self._processes, []
        holders, self._holders = self._holders, {}
        # what ran in the hosts may want to clean up; the holders only sleep
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for holder in holders.values():
            if holder.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    holder.kill()
        for process in [*processes, *holders.values()]:
            _end(process)

    @property
    def pids(self) -> dict[str, int]:
        """Every running process of the lab by role: `emulator`, `host:NAME`, `run:N`."""
        pids = {f"host:{name}": p.pid for name, p in self._holders.items()}
        if self._emulator is not None:
            pids["emulator"] = self._emulator.pid
        pids.update({f"run:{i}": p.pid for i, p in enumerate(self._processes)})
        return pids

    # -- using the hosts --------------------------------------------------------------

    def address(self, host: str) -> ipaddress.IPv4Address:
        return self.topology.hosts[host].address

    def netns_path(self, host: str) -> str:
        """The host's namespace, for `nsenter --net=` or `setns`."""
        return f"/proc/{self._holders[host].pid}/ns/net"

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` to run inside `host`'s namespace (nsenter)."""
        return ["nsenter", f"--net={self.netns_path(host)}", "--", *argv]

    def run(self, host: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `host`; the lab terminates it on `stop` if still running."""
        process: subprocess.Popen[Any] = subprocess.Popen(self.command(host, argv), **popen)
        self._processes.append(process)
        return process

    def call(self, host: str, function: Callable[[], T]) -> T:
        """`function()` run on a short-lived thread that has entered `host`'s namespace
        (setns moves only the calling thread), its result returned, its exception raised.
        Every socket it makes lives in `host`, and so do those of threads it starts: an
        HTTP request, a readiness check, a whole asyncio loop (a participant) runs there."""
        made: list[T] = []
        failed: list[BaseException] = []
        path = self.netns_path(host)

        def enter_and_call() -> None:
            try:
                kernel.setns_net(path)
            except OSError as error:
                failed.append(LabError(f"cannot enter {host}: {error}"))
                return
            try:
                made.append(function())
            except BaseException as error:  # handed to the caller below
                failed.append(error)

        thread = threading.Thread(target=enter_and_call, name=f"lab-{host}")
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        return made[0]

    def socket(self, host: str, kind: socket.SocketKind = socket.SOCK_DGRAM) -> socket.socket:
        """An IPv4 socket that lives in `host`'s namespace."""
        try:
            return self.call(host, lambda: socket.socket(socket.AF_INET, kind))
        except OSError as error:
            raise LabError(f"cannot make a socket in {host}: {error}") from error

    def stats(self) -> dict[str, Any]:
        """The emulator's ground truth (see node.lab.link.Network.stats), with its own
        figures under `emulator`."""
        reply = self._ask({"cmd": "stats"})
        stats: dict[str, Any] = reply["stats"]
        return stats

    def cut(self, links: Sequence[str], cut: bool = True) -> dict[str, bool]:
        """Cut stages at run time (`A->B` between regions, `HOST/up`, `HOST/down`: every
        packet entering them is dropped, as `cut`), or restore them with `cut=False`."""
        reply = self._ask({"cmd": "cut", "links": list(links), "cut": cut})
        if "cut" not in reply:
            raise LabError(str(reply.get("error", reply)))
        state: dict[str, bool] = reply["cut"]
        return state

    def set_rate(self, links: Sequence[str], rate_mbps: float | None) -> dict[str, float | None]:
        """Change stages' rate limits at run time (`HOST/up`, `HOST/down`, `A->B`; None:
        no limit), e.g. a weak downlink that recovers; the new rates, by stage."""
        reply = self._ask({"cmd": "rate", "links": list(links), "rate_mbps": rate_mbps})
        if "rate" not in reply:
            raise LabError(str(reply.get("error", reply)))
        state: dict[str, float | None] = reply["rate"]
        return state

    def samples(self, link: str, limit: int = 1000) -> list[float]:
        """The most recent one-way delays (ms) the emulator gave on `link`: a stage name
        (`A->B` between regions, `HOST/up`, `HOST/down`) or a path between hosts
        (`SRC->DST`)."""
        reply = self._ask({"cmd": "samples", "link": link, "limit": limit})
        if "samples" not in reply:
            raise LabError(str(reply.get("error", reply)))
        samples: list[float] = reply["samples"]
        return samples


def enter_command(holder_pid: int, argv: Sequence[str]) -> list[str]:
    """`argv` run inside the network namespace held by `holder_pid` (a host of a running
    lab), from any process of the same user: `nsenter --target PID --net`. A host's
    namespace is not nested in the lab's outer private one (network namespaces are flat),
    so entering it needs only the right to: as root, directly; without root the outer
    namespace was made with `unshare --map-root-user`, whose user namespace owns the hosts',
    so nsenter enters that user namespace first (`--user`, root inside it, as the lab is)."""
    command = ["nsenter", f"--target={holder_pid}", "--net"]
    own_user = os.readlink("/proc/self/ns/user")
    if os.readlink(f"/proc/{holder_pid}/ns/user") != own_user:
        command.append("--user")
    return [*command, "--", *argv]


def _end(process: subprocess.Popen[Any]) -> None:
    try:
        process.wait(STOP_TIMEOUT_S)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
