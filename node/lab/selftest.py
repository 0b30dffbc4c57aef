"""`sfumesh lab selftest`: the link emulator measured on this machine (issue 13, item 3).

Three hosts in three regions: `tx` sends 1200-byte UDP datagrams at 2,000 pkt/s, first to
`rx` over a link with a fixed delay and random loss, then to `capped` over a link with a
rate cap and a drop-tail queue. Send times travel in the payload; receive times are the
kernel's (SO_TIMESTAMPNS), so the receiving thread's own scheduling is not counted against
the emulator. Both clocks are CLOCK_REALTIME of one machine.

Figures: the delay error (measured one-way minus configured) p50/p99, the loss achieved,
the rate achieved against the cap (whole IP packets, 28 bytes of IP and UDP headers
included, as the cap counts them), packets received out of order, and the emulator's CPU
time per packet it read (its own `time.process_time`). Target (issue 13): delay error p99
<= 1 ms at 2,000 pkt/s on an otherwise idle machine.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from node.lab.namespaces import Lab, namespace_problem

#: IPv4 + UDP headers: the cap counts whole IP packets
HEADERS: Final = 28
_SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)
_STAMP: Final = struct.Struct("!QQ")
PORT: Final = 9000


@dataclass(frozen=True, slots=True)
class SelftestConfig:
    rate_pps: float = 2000.0
    size: int = 1200
    delay_ms: float = 50.0
    loss: float = 0.01
    cap_mbps: float = 10.0
    queue_ms: float = 50.0
    duration_s: float = 3.0
    realtime: bool = False

    def topology(self) -> str:
        """The selftest's topology file."""
        return f"""\
[regions.a]
[regions.b]
[regions.c]

[hosts.tx]
region = "a"
role = "client"

[hosts.rx]
region = "b"
role = "client"

[hosts.capped]
region = "c"
role = "client"

[core.a.b]
delay_ms = {self.delay_ms}
loss = {self.loss}

[core.a.c]
delay_ms = 1
rate_mbps = {self.cap_mbps}
queue_ms = {self.queue_ms}

[core.b.c]
delay_ms = 1
"""


@dataclass
class Received:
    """(sequence, one-way seconds, kernel receive time in seconds) of each datagram."""

    packets: list[tuple[int, float, float]] = field(default_factory=list)

    def one_way_ms(self) -> list[float]:
        return [one_way * 1e3 for _, one_way, _ in self.packets]

    def reordered(self) -> int:
        """Datagrams that arrived after one sent later."""
        count, highest = 0, -1
        for seq, _, _ in self.packets:
            if seq < highest:
                count += 1
            highest = max(highest, seq)
        return count


@dataclass(frozen=True, slots=True)
class SelftestResult:
    delay_error_ms_p50: float
    delay_error_ms_p99: float
    delay_error_ms_max: float
    cpu_us_per_packet: float
    loss_achieved: float
    loss_configured: float
    rate_achieved_mbps: float
    rate_cap_mbps: float
    rate_offered_mbps: float
    reordered: int
    sent: int
    received: int
    rate_pps: float
    delay_ms: float
    emulator_lateness_ms_p99: float
    realtime: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def _receive(sock: socket.socket, into: Received, stop: threading.Event) -> None:
    sock.settimeout(0.1)
    space = socket.CMSG_SPACE(16)
    while not stop.is_set():
        try:
            data, ancillary, _, _ = sock.recvmsg(65_535, space)
        except TimeoutError:
            continue
        received_ns = time.time_ns()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = struct.unpack("@qq", value[:16])
                received_ns = seconds * 1_000_000_000 + nanoseconds
        if len(data) < _STAMP.size:
            continue
        seq, sent_ns = _STAMP.unpack_from(data)
        into.packets.append((seq, (received_ns - sent_ns) / 1e9, received_ns / 1e9))


def _send(sock: socket.socket, to: tuple[str, int], config: SelftestConfig) -> int:
    """Paced sends for `duration_s`; how many left (a full device queue refuses some)."""
    payload = bytearray(config.size)
    count = int(config.rate_pps * config.duration_s)
    start = time.monotonic()
    sent = 0
    for seq in range(count):
        wait = start + seq / config.rate_pps - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        _STAMP.pack_into(payload, 0, seq, time.time_ns())
        try:
            sock.sendto(payload, to)
        except OSError:
            continue
        sent += 1
    return sent


def measure(
    lab: Lab, source: str, target: str, config: SelftestConfig, linger_s: float
) -> tuple[int, Received]:
    """Send paced datagrams from host `source` to host `target` for `config.duration_s`,
    wait `linger_s` for the last ones; how many were sent, and what arrived when."""
    receiver = lab.socket(target)
    sender = lab.socket(source)
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        receiver.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        address = str(lab.address(target))
        receiver.bind((address, PORT))
        received = Received()
        thread = threading.Thread(target=_receive, args=(receiver, received, stop), daemon=True)
        thread.start()
        sent = _send(sender, (address, PORT), config)
        time.sleep(linger_s)
        return sent, received
    finally:
        # the receiving thread ends before its socket closes (also on Ctrl-C)
        stop.set()
        if thread is not None:
            thread.join()
        receiver.close()
        sender.close()


def run_selftest(
    config: SelftestConfig, *, check: Callable[[], str | None] = namespace_problem
) -> SelftestResult:
    """Build the selftest lab, measure, tear it down (raises LabError if it cannot)."""
    with Lab(config.topology(), "<selftest>", realtime=config.realtime, check=check) as lab:
        before = lab.stats()["emulator"]
        sent, delayed = measure(lab, "tx", "rx", config, linger_s=config.delay_ms / 1e3 + 0.3)
        after = lab.stats()["emulator"]
        capped_sent, capped = measure(
            lab, "tx", "capped", config, linger_s=config.queue_ms / 1e3 + 0.3
        )
        realtime = lab.realtime

    errors_ms = [one_way * 1e3 - config.delay_ms for _, one_way, _ in delayed.packets]
    packets = after["packets_read"] - before["packets_read"]
    cpu_us = (after["cpu_s"] - before["cpu_s"]) * 1e6 / packets if packets else math.nan
    times = [at for _, _, at in capped.packets]
    span = max(times) - min(times) if len(times) > 1 else 0.0
    wire_bits = (config.size + HEADERS) * 8
    rate = (len(times) - 1) * wire_bits / span / 1e6 if span > 0 else math.nan
    lateness = after["lateness_ms"]["p99"]
    return SelftestResult(
        delay_error_ms_p50=percentile(errors_ms, 50),
        delay_error_ms_p99=percentile(errors_ms, 99),
        delay_error_ms_max=max(errors_ms, default=math.nan),
        cpu_us_per_packet=cpu_us,
        loss_achieved=1 - len(delayed.packets) / sent if sent else math.nan,
        loss_configured=config.loss,
        rate_achieved_mbps=rate,
        rate_cap_mbps=config.cap_mbps,
        rate_offered_mbps=config.rate_pps * wire_bits / 1e6,
        reordered=delayed.reordered() + capped.reordered(),
        sent=sent + capped_sent,
        received=len(delayed.packets) + len(capped.packets),
        rate_pps=config.rate_pps,
        delay_ms=config.delay_ms,
        emulator_lateness_ms_p99=math.nan if lateness is None else lateness,
        realtime=realtime,
    )


def format_table(result: SelftestResult) -> str:
    """The selftest's figures as a small table."""
    r = result
    rows = [
        ("delay error p50", f"{r.delay_error_ms_p50:+.3f} ms", f"configured {r.delay_ms:g} ms"),
        ("delay error p99", f"{r.delay_error_ms_p99:+.3f} ms", "target <= 1 ms (idle machine)"),
        ("delay error max", f"{r.delay_error_ms_max:+.3f} ms", ""),
        ("loss", f"{r.loss_achieved:.2%}", f"configured {r.loss_configured:.2%}"),
        (
            "rate",
            f"{r.rate_achieved_mbps:.2f} Mbit/s",
            f"cap {r.rate_cap_mbps:g}, offered {r.rate_offered_mbps:.2f}",
        ),
        ("reordered", str(r.reordered), f"of {r.received} received ({r.sent} sent)"),
        ("emulator CPU", f"{r.cpu_us_per_packet:.1f} us/packet", f"at {r.rate_pps:g} pkt/s"),
        (
            "emulator late",
            f"{r.emulator_lateness_ms_p99:.3f} ms p99",
            "real-time priority" if r.realtime else "normal priority",
        ),
    ]
    width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return "\n".join(
        f"{name:<{width}}  {value:>{value_width}}  {note}".rstrip() for name, value, note in rows
    )
