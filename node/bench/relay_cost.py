"""The relay's CPU per relayed packet, fitted as a slope (issue 19), for `sfumesh bench relay`.

The relay bench's own CPU figure is a difference of two windows at ~160 packets/s: small
against the noise of a shared machine. Here the same two nodes carry T = 1, 4, 16 relayed
tracks (`--relay-tracks`), and each node's CPU is fitted by least squares against the packets
per second, as `sfumesh bench forward` fits fan-out:

* **relayed**: T video-only publishers on node-2, one subscriber of all T on node-1: every
  packet crosses the relay. The slope of node-2's CPU is the sending side (taking the packet
  in from its publisher and sending it over the relay), node-1's the receiving side (taking
  it in from the relay and handing it to the subscriber);
* **local**: the same T publishers and subscriber all on node-1 (no relay): the local path's
  slope (taken in from the publisher, handed to the subscriber) in the same run.

`relay_us_per_packet_slope` = {sending, receiving, sum}; beside it `local_us_per_packet_slope`,
their difference (`relay_own_us_per_packet_slope`: what relaying adds to a packet's way) and
the ratio (target: the sum at most twice the local path's cost).

The clients are the forward bench's (`node.bench.forward.peers`, in their own processes:
pre-encoded VP8 sent through tapped senders, raw RTP counted, nothing encoded or decoded), so
only the nodes do media work. This module may use them; `node.bench.relay` may not (benches
never import each other), so the CLI hands `measure_relay_slope` to the relay bench.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from redis.asyncio import Redis

from node.bench.forward import media as bench_media
from node.bench.forward.run import ClientProcess, fit_line, split_evenly
from node.bench.report import metric_sum, process_cpu_s, rounded, say
from node.local.launch import LocalNode
from node.relay.manager import read_relays
from node.runtime.services import BackingServices

DEFAULT_TRACKS: Final = (1, 4, 16)
#: small frames: 1-2 packets each, so 16 tracks stay well within a shared machine
MEDIA: Final = bench_media.MediaParams(width=320, height=180, bitrate=400_000)
PUBLISHERS_PER_PROCESS: Final = 4
WARMUP_S: Final = 3.0
#: 16 tracks are 16 subscribe renegotiations: minutes on a loaded 2-core machine
SETUP_TIMEOUT_S: Final = 240.0
#: the target of issue 19: both sides together at most this many times the local path
TARGET_RATIO: Final = 2.0
PASSWORD: Final = "bench relay slope password"  # noqa: S105 (throwaway users)
ADDRESS: Final = "127.0.0.1"


@dataclass
class SlopeWindow:
    """One window: T tracks, relayed (publishers on node-2) or local (all on node-1)."""

    path: str
    tracks: int
    seconds: float = 0.0
    #: node name -> CPU seconds in the window
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: RTP packets the subscriber received (all T tracks), and lost
    packets: int = 0
    lost: int = 0
    #: packets node-2 sent over the relay and node-1 received from it (metrics)
    relayed_out: int = 0
    relayed_in: int = 0
    error: str | None = None

    @property
    def packets_per_s(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0

    def cpu_us_per_s(self, node: str) -> float:
        return 1e6 * self.cpu_s.get(node, 0.0) / self.seconds if self.seconds else 0.0


def slope_figures(windows: list[SlopeWindow]) -> dict[str, Any]:
    """The fitted slopes (us per packet) over the windows that completed."""

    def slope(path: str, node: str) -> float | None:
        used = [w for w in windows if w.path == path and w.error is None and w.packets]
        line = fit_line([w.packets_per_s for w in used], [w.cpu_us_per_s(node) for w in used])
        return None if line is None else line.slope

    sending, receiving = slope("relayed", "node-2"), slope("relayed", "node-1")
    local = slope("local", "node-1")
    total = None if sending is None or receiving is None else sending + receiving
    own = None if total is None or local is None else total - local
    ratio = None if total is None or local is None or local <= 0 else total / local
    return {
        "relay_us_per_packet_slope": {
            "sending": rounded(sending),
            "receiving": rounded(receiving),
            "sum": rounded(total),
        },
        "local_us_per_packet_slope": rounded(local),
        "relay_own_us_per_packet_slope": rounded(own),
        "relay_over_local": rounded(ratio),
        "relay_slope_target": {
            "relay_over_local_max": TARGET_RATIO,
            "met": None if ratio is None else ratio <= TARGET_RATIO,
        },
        "relay_slope_tracks": sorted({w.tracks for w in windows}),
        "relay_slope_windows": [
            {
                **asdict(w),
                "packets_per_s": rounded(w.packets_per_s, 1),
                "cpu_s": {k: round(v, 3) for k, v in w.cpu_s.items()},
            }
            for w in windows
        ],
    }


class _Slopes:
    def __init__(
        self,
        nodes: list[LocalNode],
        services: BackingServices,
        workdir: Path,
        window_s: float,
        warmup_s: float,
    ) -> None:
        self.nodes = {node.name: node for node in nodes}
        self.services = services
        self.workdir = workdir
        self.window_s = window_s
        self.warmup_s = warmup_s
        self.stamp = secrets.token_hex(3)
        self.publisher_tokens: list[str] = []
        self.subscriber_token = ""
        self.rooms = 0

    async def users(self, http: httpx.AsyncClient, publishers: int) -> None:
        url = self.nodes["node-1"].url
        # a person publishes a few tracks per room at most: one user per publisher
        self.publisher_tokens = [
            await _sign_up(http, url, f"slope{self.stamp}p{n}") for n in range(publishers)
        ]
        self.subscriber_token = await _sign_up(http, url, f"slope{self.stamp}s")

    async def room(self, http: httpx.AsyncClient) -> str:
        self.rooms += 1
        slug = f"relay-slope-{self.stamp}-{self.rooms}"
        created = await http.post(
            f"{self.nodes['node-1'].url}/api/rooms",
            json={"slug": slug, "capacity": 100},
            headers={"Authorization": f"Bearer {self.subscriber_token}"},
        )
        created.raise_for_status()
        return slug

    async def window(
        self, http: httpx.AsyncClient, redis: Redis, media_path: Path, path: str, tracks: int
    ) -> SlopeWindow:
        window = SlopeWindow(path, tracks)
        workdir = self.workdir / f"{path}-t{tracks}"
        clients: list[ClientProcess] = []
        try:
            # a relay left from a failed window is that window's failure, not the run's
            await _no_relay(redis)
            slug = await self.room(http)
            source = self.nodes["node-2" if path == "relayed" else "node-1"]
            spec: dict[str, Any] = {
                "system": "sfumesh",
                "url": source.url,
                "user_token": self.publisher_tokens[0],
                "room": slug,
                "channels": [{"user_token": token} for token in self.publisher_tokens[:tracks]],
            }
            first = 0
            for number, count in enumerate(split_evenly(tracks, PUBLISHERS_PER_PROCESS)):
                argv = [
                    *_argv("publisher", spec),
                    "--media",
                    str(media_path),
                    "--count",
                    str(count),
                    "--first",
                    str(first),
                    "--video-only",
                ]
                first += count
                clients.append(
                    ClientProcess(f"publishers-{number}", argv, workdir / f"p{number}.log")
                )
            subscriber_spec = {
                "system": "sfumesh",
                "url": self.nodes["node-1"].url,
                "user_token": self.subscriber_token,
                "room": slug,
            }
            subscriber = ClientProcess(
                "subscriber",
                [*_argv("subscribers", subscriber_spec), "--streams", str(tracks)],
                workdir / "subscriber.log",
            )
            await asyncio.gather(*(c.start() for c in clients))
            await asyncio.gather(*(c.expect("ready", SETUP_TIMEOUT_S + 10) for c in clients))
            clients.append(subscriber)
            await subscriber.start()
            await subscriber.expect("ready", SETUP_TIMEOUT_S + 10)
            await asyncio.sleep(self.warmup_s)
            before = await self._sample(http, clients, subscriber)
            await asyncio.sleep(self.window_s)
            after = await self._sample(http, clients, subscriber)
            window.seconds = after["t"] - before["t"]
            for name in self.nodes:
                window.cpu_s[name] = after["cpu"][name] - before["cpu"][name]
            window.relayed_out = int(after["out"] - before["out"])
            window.relayed_in = int(after["in"] - before["in"])
            for report in after["marked"]["subscribers"]:
                for stream in report["streams"].values():
                    window.packets += int(stream["packets"])
                    window.lost += int(stream["lost"])
        except Exception as error:  # one failed window is reported; the fit goes on
            window.error = f"{type(error).__name__}: {error}"
        finally:
            await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        return window

    async def _sample(
        self, http: httpx.AsyncClient, clients: list[ClientProcess], subscriber: ClientProcess
    ) -> dict[str, Any]:
        await asyncio.gather(*(c.send("mark") for c in clients))
        at = time.monotonic()
        cpu = {}
        for name, node in self.nodes.items():
            assert node.process.pid is not None
            cpu[name] = process_cpu_s(node.process.pid)
        replies = await asyncio.gather(*(c.expect("marked", 60.0) for c in clients))
        out = metric_sum(
            (await http.get(f"{self.nodes['node-2'].url}/metrics")).text,
            "sfumesh_relay_packets_total",
            'direction="out"',
        )
        got = metric_sum(
            (await http.get(f"{self.nodes['node-1'].url}/metrics")).text,
            "sfumesh_relay_packets_total",
            'direction="in"',
        )
        return {"t": at, "cpu": cpu, "marked": replies[-1], "out": out, "in": got}


def _argv(role: str, spec: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "node.bench.forward.peers",
        role,
        "--spec",
        json.dumps(spec),
        "--address",
        ADDRESS,
        "--timeout",
        str(SETUP_TIMEOUT_S),
    ]


async def _sign_up(http: httpx.AsyncClient, url: str, name: str) -> str:
    body = {"username": name, "email": f"{name}@example.org", "password": PASSWORD}
    reply = await http.post(f"{url}/api/users", json={**body, "display_name": name})
    reply.raise_for_status()
    login = await http.post(f"{url}/api/auth/login", json={"login": name, "password": PASSWORD})
    login.raise_for_status()
    token: str = login.json()["user_token"]
    return token


async def _no_relay(redis: Redis, within_s: float = 60.0) -> None:
    """Until neither node reports a relay (the previous window's has closed)."""
    deadline = time.monotonic() + within_s
    while True:
        one, two = await read_relays(redis, "node-1"), await read_relays(redis, "node-2")
        if "node-2" not in one and "node-1" not in two:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the relay between node-1 and node-2 did not close")
        await asyncio.sleep(0.2)


async def _measure(
    nodes: list[LocalNode],
    services: BackingServices,
    workdir: Path,
    window_s: float,
    tracks: list[int],
    warmup_s: float,
) -> list[SlopeWindow]:
    _, media_path = await asyncio.to_thread(bench_media.load_or_encode, MEDIA)
    slopes = _Slopes(nodes, services, workdir, window_s, warmup_s)
    redis = Redis.from_url(services.redis_url)
    windows: list[SlopeWindow] = []
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await slopes.users(http, max(tracks))
            for index, count in enumerate(tracks):
                # alternate the order, so that a drift of the machine's load favours neither
                order = ["relayed", "local"] if index % 2 == 0 else ["local", "relayed"]
                for path in order:
                    window = await slopes.window(http, redis, media_path, path, count)
                    windows.append(window)
                    outcome = window.error or (
                        f"{window.packets_per_s:.0f} pkt/s, node-1 "
                        f"{100 * window.cpu_s['node-1'] / window.seconds:.1f} %, node-2 "
                        f"{100 * window.cpu_s['node-2'] / window.seconds:.1f} %"
                    )
                    say(f"[relay slope {path} T={count}] {outcome}", err=True)
    finally:
        await redis.aclose()
    return windows


def measure_relay_slope(
    nodes: list[LocalNode],
    services: BackingServices,
    workdir: Path,
    window_s: float,
    tracks: list[int],
    warmup_s: float = WARMUP_S,
) -> dict[str, Any]:
    """The slope figures on the bench's two running nodes (node-1, node-2)."""
    windows = asyncio.run(_measure(nodes, services, workdir, window_s, tracks, warmup_s))
    return slope_figures(windows)
