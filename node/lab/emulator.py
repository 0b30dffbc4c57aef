"""The emulator process: one TUN device per host namespace around the pure link model.

Started by `node.lab.namespaces.Lab` as `python -m node.lab.emulator`; everything else in
the lab talks to it over its stdin and stdout, one JSON object per line:

* in, first: `{"topology": TOML text, "source": name, "namespaces": {host: pid},
  "realtime": bool}`; out: `{"ready": {"devices": {host: name}, "realtime": bool}}`, or
  `{"error": message}` and exit status 1;
* in: `{"cmd": "stats"}`; out: `{"stats": {...}}` (`Network.stats()` plus the emulator's
  own figures: CPU seconds, packets read and written, lateness of each write after its due
  time);
* in: `{"cmd": "samples", "link": name, "limit": n}`; out: `{"samples": [ms, ...]}`, the
  link's most recent one-way delays (a stage name, or a path "SRC->DST" between hosts);
* in: `{"cmd": "cut", "links": [stage, ...], "cut": bool}`; out: `{"cut": {stage: bool}}`:
  cuts the stages at once (every packet entering them is dropped, counted as `cut`) or
  restores them; a fault injected at run time (an unknown stage: an `error`, nothing cut);
* in: `{"cmd": "rate", "links": [stage, ...], "rate_mbps": number | null}`; out:
  `{"rate": {stage: rate_mbps}}`: changes the stages' rate limits at once (null: none), a
  link's capacity changing at run time (an unknown stage or a bad rate: an `error`, nothing
  changed);
* in: `{"cmd": "quit"}` or end of input (the lab went away): the devices close, and with
  them vanish from their namespaces.

Per host it opens a TUN device in its own (the lab's private) namespace, moves it into the
host's namespace (`ip link set DEV netns PID`) and gives it the host's /32 from
198.18.0.0/15 plus a route for that range, so every packet between hosts comes here. A
packet is forwarded by its destination address after the link model (node.lab.link), on
epoll with a timerfd armed for the next due packet: no NAT, bridge or veth.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any, Final

from node.lab import kernel
from node.lab.link import DelayStats, Network, network_for
from node.lab.topology import LAB_NETWORK, Topology, parse_topology

log = logging.getLogger(__name__)

#: larger than any packet a TUN device with the default MTU hands over
_READ_SIZE: Final = 65_535
#: SCHED_FIFO priority with `realtime` (FINDINGS: p99 53.7 -> ~50.6 ms under two CPU hogs)
REALTIME_PRIORITY: Final = 20


class EmulatorError(RuntimeError):
    """The emulator could not set up its devices."""


def _ip(args: list[str], *, netns_pid: int | None = None, batch: str | None = None) -> None:
    argv = ["ip", *args]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *argv]
    result = subprocess.run(argv, input=batch, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmulatorError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")


def device_name(index: int) -> str:
    """The TUN device of the `index`th host (unique per emulator process, < 16 bytes)."""
    return f"sl{os.getpid()}n{index}"


def plug(topology: Topology, namespaces: Mapping[str, int]) -> dict[str, int]:
    """A TUN device per host, moved into its namespace and addressed; host -> fd. On error
    the devices made so far are closed (hence gone) and EmulatorError is raised."""
    fds: dict[str, int] = {}
    try:
        for index, host in enumerate(topology.hosts.values()):
            name = device_name(index)
            pid = namespaces[host.name]
            try:
                fds[host.name] = kernel.open_tun(name)
            except OSError as error:
                raise EmulatorError(
                    f"cannot open a TUN device ({kernel.TUN_PATH}): {error}"
                ) from error
            _ip(["link", "set", "dev", name, "netns", str(pid)])
            _ip(
                ["-batch", "-"],
                netns_pid=pid,
                batch="\n".join(
                    [
                        "link set dev lo up",
                        # no IPv6 link-local: only loopback and the lab range in a host
                        f"link set dev {name} addrgenmode none",
                        f"addr add {host.address}/32 dev {name}",
                        f"link set dev {name} up",
                        f"route add {LAB_NETWORK} dev {name}",
                    ]
                )
                + "\n",
            )
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


@dataclass
class Counters:
    """The emulator's own figures (the link model keeps the links')."""

    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    not_ipv4: int = 0
    unroutable: int = 0
    write_errors: int = 0
    lateness: DelayStats = field(default_factory=DelayStats)

    def as_dict(self) -> dict[str, Any]:
        times = os.times()
        return {
            # system time includes the kernel's handling of what the devices carry
            "cpu_s": times.user + times.system,
            "cpu_user_s": times.user,
            "cpu_system_s": times.system,
            "packets_read": self.packets_read,
            "bytes_read": self.bytes_read,
            "packets_written": self.packets_written,
            "not_ipv4": self.not_ipv4,
            "unroutable": self.unroutable,
            "write_errors": self.write_errors,
            "lateness_ms": self.lateness.summary_ms(),
        }


def _reply(out: IO[str], message: Mapping[str, Any]) -> None:
    out.write(json.dumps(_clean(message), allow_nan=False) + "\n")
    out.flush()


def _clean(value: Any) -> Any:
    """NaN is not JSON: None instead."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _samples(network: Network[bytes], link: str, limit: int) -> list[float] | None:
    if link in network.stages:
        samples = network.stages[link].stats.delay.samples
    else:
        src, _, dst = link.partition("->")
        path = network.path_stats.get((src, dst))
        if path is None:
            return None
        samples = path.delay.samples
    recent = list(samples)[-limit:] if limit > 0 else []
    return [s * 1e3 for s in recent]


def _command(
    message: Mapping[str, Any], network: Network[bytes], counters: Counters, out: IO[str]
) -> bool:
    """Answer one control message; False: quit."""
    command = message.get("cmd")
    if command == "quit":
        return False
    if command == "stats":
        _reply(out, {"stats": {**network.stats(), "emulator": counters.as_dict()}})
    elif command == "samples":
        samples = _samples(network, str(message.get("link")), int(message.get("limit", 1000)))
        if samples is None:
            _reply(out, {"error": f"no link or path {message.get('link')!r}"})
        else:
            _reply(out, {"samples": samples})
    elif command == "cut":
        links = [str(name) for name in message.get("links", [])]
        unknown = [name for name in links if name not in network.stages]
        if unknown or not links:
            _reply(out, {"error": f"no such links {unknown or links!r}"})
        else:
            for name in links:
                network.stages[name].cut = bool(message.get("cut", True))
            _reply(out, {"cut": {name: network.stages[name].cut for name in links}})
    elif command == "rate":
        links = [str(name) for name in message.get("links", [])]
        unknown = [name for name in links if name not in network.stages]
        rate = message.get("rate_mbps")
        if unknown or not links:
            _reply(out, {"error": f"no such links {unknown or links!r}"})
        elif rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
        ):
            _reply(out, {"error": f"rate_mbps must be a number > 0 or null, not {rate!r}"})
        else:
            for name in links:
                network.stages[name].set_rate(None if rate is None else float(rate))
            _reply(out, {"rate": {name: network.stages[name].params.rate_mbps for name in links}})
    else:
        _reply(out, {"error": f"unknown command {command!r}"})
    return True


def _commands(pending: bytes, network: Network[bytes], counters: Counters, out: IO[str]) -> bool:
    """Answer every complete line of `pending`; False: quit."""
    for line in pending.split(b"\n")[:-1]:
        if line.strip() and not _command(json.loads(line), network, counters, out):
            return False
    return True


def serve(
    topology: Topology,
    network: Network[bytes],
    fds: Mapping[str, int],
    control: int,
    out: IO[str],
    pending: bytes = b"",
) -> None:
    """Forward packets between the hosts' devices until `control` says quit or closes."""
    by_fd = {fd: host for host, fd in fds.items()}
    by_address = {host.address.packed: host.name for host in topology.hosts.values()}
    counters = Counters()
    timer = kernel.timerfd()
    poller = select.epoll()
    try:
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        poller.register(timer, select.EPOLLIN)
        poller.register(control, select.EPOLLIN)
        armed: float | None = None
        if not _commands(pending, network, counters, out):
            return
        pending = pending[pending.rfind(b"\n") + 1 :]
        while True:
            due = network.next_due()
            if due != armed:
                kernel.arm_timerfd(timer, due)
                armed = due
            events = poller.poll()
            now = time.monotonic()
            for fd, _ in events:
                if fd == timer:
                    try:
                        os.read(timer, 8)
                    except BlockingIOError:
                        pass
                    armed = None  # fired (or stale): re-armed on the next turn
                elif fd == control:
                    chunk = os.read(control, 65_536)
                    if not chunk:
                        return
                    pending += chunk
                    if not _commands(pending, network, counters, out):
                        return
                    pending = pending[pending.rfind(b"\n") + 1 :]
                else:
                    src = by_fd[fd]
                    while True:
                        try:
                            packet = os.read(fd, _READ_SIZE)
                        except BlockingIOError:
                            break
                        counters.packets_read += 1
                        counters.bytes_read += len(packet)
                        if len(packet) < 20 or packet[0] >> 4 != 4:
                            counters.not_ipv4 += 1
                            continue
                        dst = by_address.get(packet[16:20])
                        if dst is None or not network.submit(now, src, dst, packet, len(packet)):
                            counters.unroutable += 1
            for delivery in network.pop_due(time.monotonic()):
                try:
                    os.write(fds[str(delivery.dst)], delivery.payload)
                except OSError as error:
                    # a full or vanished device: the packet is lost, as on a real link
                    if error.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL):
                        raise
                    counters.write_errors += 1
                    continue
                counters.packets_written += 1
                counters.lateness.add(time.monotonic() - delivery.due)
    finally:
        poller.close()
        os.close(timer)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    """`python -m node.lab.emulator`: the protocol in the module docstring."""
    logging.basicConfig(level=logging.WARNING, format="lab emulator: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    out = sys.stdout
    control = sys.stdin.fileno()
    # unbuffered: what follows the first line belongs to `serve`
    pending = b""
    while b"\n" not in pending:
        chunk = os.read(control, 65_536)
        if not chunk:
            return 0
        pending += chunk
    line, pending = pending.split(b"\n", 1)
    fds: dict[str, int] = {}
    try:
        config = json.loads(line)
        topology = parse_topology(config["topology"], config.get("source", "<topology>"))
        namespaces = {str(k): int(v) for k, v in config["namespaces"].items()}
        realtime = False
        if config.get("realtime"):
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
                realtime = True
            except OSError as error:
                log.warning("no real-time priority (%s): running as a normal process", error)
        kernel.tight_timers()
        fds = plug(topology, namespaces)
        names = {host: device_name(i) for i, host in enumerate(topology.hosts)}
        _reply(out, {"ready": {"devices": names, "realtime": realtime}})
        network: Network[bytes] = network_for(topology)
        serve(topology, network, fds, control, out, pending)
        return 0
    except (EmulatorError, ValueError, KeyError, OSError) as error:
        _reply(out, {"error": str(error)})
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for fd in fds.values():
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
