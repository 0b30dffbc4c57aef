"""`sfumesh cluster members|rtt|rooms|sessions|relays|files [--json]`: the operator's view (N8).

`targets --out FILE [--watch]` writes Prometheus file_sd targets from Serf membership (and
with `--watch` rewrites them whenever a node comes or goes); `monitoring-files --out DIR`
writes the shipped Prometheus configuration, rules and Grafana dashboard (issue 18).

`files` lists rooms by the bytes of files they keep (issue 15), largest first, from the
quota counters in Redis: storage per room is here, not a Prometheus label per room.

Membership and coordinates come from any node's Serf agent over RPC (`--rpc-addr`,
`--rpc-auth`); rooms, sessions and relays from the cluster's Redis (`--redis-url`; each node
writes its relays' figures there every few seconds). Each falls back
to the node configuration (`--config FILE` and the usual environment variables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from mesh.membership import MembershipView, NodeMember
from mesh.serf import SerfClient, SerfError
from mesh.vivaldi import estimate_rtt
from node.config import ConfigError, Settings, load_settings
from node.relay.manager import read_relays
from node.runtime.monitoring import write_monitoring_files, write_targets
from node.state import keys
from node.state.connect import open_redis_with
from node.state.quota import bytes_by_room
from node.state.sessions import Membership, read_session

COMMANDS = (
    "members",
    "rtt",
    "rooms",
    "sessions",
    "relays",
    "files",
    "targets",
    "monitoring-files",
)
#: how often `targets --watch` compares the membership view with the file
WATCH_PERIOD_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=COMMANDS, help="what to show")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    parser.add_argument("--config", type=Path, help="a node's TOML configuration")
    parser.add_argument("--rpc-addr", help="a Serf agent's RPC address (host:port)")
    parser.add_argument("--rpc-auth", help="its RPC auth key (or SFUMESH_SERF_RPC_AUTH)")
    parser.add_argument("--redis-url", help="the cluster's Redis (or REDIS_URL)")
    parser.add_argument(
        "--out",
        type=Path,
        help="targets: the file_sd JSON file to write; monitoring-files: the directory",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="targets: keep running, rewriting the file whenever membership changes",
    )


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


async def _view(args: argparse.Namespace, settings: Settings) -> MembershipView:
    rpc_addr = args.rpc_addr or settings.serf.rpc_addr
    auth = args.rpc_auth if args.rpc_auth is not None else settings.serf.rpc_auth
    secret = auth if isinstance(auth, str) else auth.get_secret_value()
    client = SerfClient(rpc_addr, secret, reconnect=False)
    await client.connect()
    view = MembershipView(client)
    try:
        await view.resync()
    finally:
        await client.close()
    return view


def _member_row(member: NodeMember) -> dict[str, Any]:
    return {
        "name": member.name,
        "region": member.region,
        "status": member.status,
        "address": f"{member.addr}:{member.port}",
        "http": member.http,
        "sessions": member.load.sessions,
        "cpu_percent": member.load.cpu_percent,
        "coordinate_error": None if member.coordinate is None else member.coordinate.error,
    }


async def _members(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    view = await _view(args, settings)
    return [_member_row(m) for m in sorted(view.members.values(), key=lambda m: m.name)]


async def _rtt(args: argparse.Namespace, settings: Settings) -> dict[str, dict[str, float | None]]:
    coords = (await _view(args, settings)).coordinates()
    names = sorted(coords)
    return {
        a: {b: round(estimate_rtt(coords[a], coords[b]) * 1000, 3) for b in names} for a in names
    }


def _redis(args: argparse.Namespace, settings: Settings) -> Redis:
    url = args.redis_url or settings.redis_url.get_secret_value()
    if not url and settings.redis.mode != "sentinel":
        raise ConfigError("the cluster's Redis is not known: give --redis-url or REDIS_URL")
    return open_redis_with(settings.redis, url)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _rooms(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    redis = _redis(args, settings)
    try:
        rows = []
        for slug in sorted(_text(s) for s in await redis.smembers(keys.ROOMS_LIVE)):
            raw = await redis.hgetall(keys.room_members(slug))
            members = [Membership.decode(v) for v in raw.values()]
            if not members:
                continue
            rows.append(
                {
                    "room": slug,
                    "people": len({m.user_id for m in members}),
                    "sessions": len(members),
                    "nodes": sorted({m.node for m in members}),
                }
            )
        return rows
    finally:
        await redis.aclose()


async def _sessions(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    redis = _redis(args, settings)
    try:
        rows = []
        for node in sorted(_text(n) for n in await redis.smembers(keys.NODES)):
            for session_id in sorted(
                _text(s) for s in await redis.smembers(keys.node_sessions(node))
            ):
                record = await read_session(redis, session_id)
                if record is None:
                    continue
                rows.append(
                    {
                        "session_id": record.session_id,
                        "user_id": record.user_id,
                        "node": record.node,
                        "region": record.region,
                        "room": record.room or None,
                        "generation": record.generation,
                    }
                )
        return rows
    finally:
        await redis.aclose()


async def _relays(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    """One row per node pair, from what both ends report (`sfumesh:relays:<node>`): the
    direction a->b is the first node's "out" and the second's "in"."""
    redis = _redis(args, settings)
    try:
        ends: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for node in sorted(_text(n) for n in await redis.smembers(keys.NODES)):
            for entry in (await read_relays(redis, node)).values():
                pair = (str(entry["pair"][0]), str(entry["pair"][1]))
                ends.setdefault(pair, {})[node] = entry
    finally:
        await redis.aclose()
    rows = []
    for (first, second), by_node in sorted(ends.items()):
        a, b = by_node.get(first, {}), by_node.get(second, {})
        either = a or b
        rtts = [e["rtt_ms"] for e in (a, b) if e.get("rtt_ms") is not None]
        rows.append(
            {
                "pair": [first, second],
                "state": either.get("state"),
                "rooms": sorted(set(a.get("rooms", [])) | set(b.get("rooms", []))),
                "tracks_ab": a.get("tracks_out", b.get("tracks_in")),
                "tracks_ba": a.get("tracks_in", b.get("tracks_out")),
                "kbps_ab": _kbps(a.get("bitrate_out_bps", b.get("bitrate_in_bps"))),
                "kbps_ba": _kbps(a.get("bitrate_in_bps", b.get("bitrate_out_bps"))),
                "rtt_ms": round(sum(rtts) / len(rtts), 2) if rtts else None,
                "rtt_estimated_ms": either.get("rtt_estimated_ms"),
                "lost_ab": b.get("packets_lost_in"),
                "lost_ba": a.get("packets_lost_in"),
                "jitter_ab_ms": b.get("jitter_in_ms"),
                "jitter_ba_ms": a.get("jitter_in_ms"),
                "setup_ms": either.get("setup_ms"),
            }
        )
    return rows


async def _files(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    """Rooms by bytes of files kept (or being uploaded), largest first, with their share of
    `files.room_quota_bytes`."""
    redis = _redis(args, settings)
    try:
        rooms = await bytes_by_room(redis)
    finally:
        await redis.aclose()
    quota = settings.files.room_quota_bytes
    return [
        {
            "room": slug,
            "bytes": stored,
            "mb": round(stored / 1_000_000, 1),
            "quota_percent": round(100 * stored / quota, 1),
        }
        for slug, stored in sorted(rooms.items(), key=lambda item: (-item[1], item[0]))
    ]


def _kbps(bps: Any) -> float | None:
    return None if bps is None else round(float(bps) / 1000, 1)


def _table(rows: Sequence[dict[str, Any]], empty: str) -> str:
    if not rows:
        return empty
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


async def _targets(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Write the file_sd targets once, or (`--watch`) on every membership change until
    SIGINT/SIGTERM."""
    out: Path = args.out
    if not args.watch:
        view = await _view(args, settings)
        written, count = write_targets(out, view.members.values())
        return {"file": str(out), "targets": count, "written": written}
    rpc_addr = args.rpc_addr or settings.serf.rpc_addr
    auth = args.rpc_auth if args.rpc_auth is not None else settings.serf.rpc_auth
    secret = auth if isinstance(auth, str) else auth.get_secret_value()
    # Reconnecting: an agent restarting must not end the watch (the view resyncs after).
    client = SerfClient(rpc_addr, secret, reconnect=True)
    await client.connect()
    view = MembershipView(client, resync_s=settings.serf.resync_period_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await view.start()
    rewrites = 0
    try:
        while not stop.is_set():
            written, count = write_targets(out, view.members.values())
            if written:
                rewrites += 1
                print(f"sfumesh cluster targets: {count} targets -> {out}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_PERIOD_S)
    finally:
        await view.stop()
        await client.close()
    return {"file": str(out), "rewrites": rewrites}


async def _run(args: argparse.Namespace) -> Any:
    settings = _settings(args)
    if args.what in ("targets", "monitoring-files") and args.out is None:
        raise ConfigError(f"{args.what} needs --out")
    if args.what == "monitoring-files":
        return {"files": [str(path) for path in write_monitoring_files(args.out)]}
    if args.what == "targets":
        return await _targets(args, settings)
    if args.what == "members":
        return await _members(args, settings)
    if args.what == "rtt":
        return await _rtt(args, settings)
    if args.what == "rooms":
        return await _rooms(args, settings)
    if args.what == "sessions":
        return await _sessions(args, settings)
    if args.what == "files":
        return await _files(args, settings)
    return await _relays(args, settings)


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(_run(args))
    except (ConfigError, SerfError, OSError) as error:
        print(f"sfumesh cluster {args.what}: {error}", file=sys.stderr)
        return 1
    if args.json or args.what in ("targets", "monitoring-files"):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.what == "rtt":
        names = list(result)
        rows = [{"ms": a, **{b: result[a][b] for b in names}} for a in names]
        print(_table(rows, "no coordinates yet"))
    else:
        print(_table(result, f"no {args.what}"))
    return 0
