"""`sfumesh`: the command line (node, demo, bench, cluster, lab, keygen)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.process import PRIVATE_UMASK
from node.bench.failover import add_arguments as add_failover_arguments
from node.bench.faults import add_arguments as add_faults_arguments
from node.bench.geo import add_arguments as add_geo_arguments
from node.bench.quality import add_arguments as add_quality_arguments
from node.bench.relay import add_arguments as add_relay_arguments
from node.bench.vivaldi import add_arguments as add_vivaldi_arguments
from node.cli import cluster as cluster_cli
from node.cli import lab as lab_cli
from node.config import ConfigError, load_settings, new_key
from node.log import setup_logging


def _node(args: argparse.Namespace) -> int:
    from node.web.server import run_node

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "node_name": args.node_name,
            "region": args.region,
            "data_dir": args.data_dir,
        }.items()
        if value is not None
    }
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as error:
        print(f"sfumesh node: bad configuration: {error}", file=sys.stderr)
        return 2
    if not settings.tokens.keys:
        print(
            'sfumesh node: no token signing keys. Set SFUMESH_TOKEN_KEYS=\'{"k1": "<secret>"}\' '
            "and SFUMESH_TOKEN_SIGNING_KEY_ID=k1 (or [tokens] in the config file); "
            "`sfumesh keygen` prints a fresh key.",
            file=sys.stderr,
        )
        return 2
    try:
        settings.check_mesh()
    except ConfigError as error:
        print(f"sfumesh node: bad configuration: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    # what the node and its children write (databases, snapshots, logs) is its user's alone
    os.umask(PRIVATE_UMASK)
    return asyncio.run(run_node(settings))


def _demo(args: argparse.Namespace) -> int:
    from node.local.demo import run_demo

    return run_demo(
        nodes=args.nodes,
        smoke=args.smoke,
        port=args.port,
        data_dir=args.data_dir,
        turn_server=args.turn,
    )


def _bench_forward(args: argparse.Namespace) -> int:
    from node.bench.forward.run import (
        parse_publishers,
        parse_size,
        parse_subscribers,
        run_forward_bench,
    )

    try:
        subscribers = parse_subscribers(args.subscribers)
        publishers = parse_publishers(args.publishers)
        video_size = parse_size(args.video_size)
    except ValueError as error:
        print(f"sfumesh bench: {error}", file=sys.stderr)
        return 2
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    setup_logging("WARNING")
    return run_forward_bench(
        subscribers=subscribers,
        rounds=2 if args.rounds is None else args.rounds,
        window_s=args.window,
        warmup_s=args.warmup,
        systems=systems,
        json_path=args.json,
        max_mediarelay=args.max_mediarelay,
        video_size=video_size,
        workdir=args.workdir,
        publishers=publishers,
        ingest_systems=(
            [s.strip() for s in args.ingest_systems.split(",") if s.strip()]
            if args.ingest_systems
            else None
        ),
        plot_path=args.plot,
    )


def _bench_scale(args: argparse.Namespace) -> int:
    from node.bench.scale import ScaleConfig, node_counts_up_to, run_scale_bench

    try:
        sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    except ValueError:
        print("sfumesh bench: --sizes takes room sizes, comma-separated", file=sys.stderr)
        return 2
    config = ScaleConfig(
        sizes=sizes,
        node_counts=node_counts_up_to(args.max_nodes),
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_participants=args.max_participants,
        people=args.people,
        start=args.start,
        step=args.step,
    )
    setup_logging("WARNING")
    return run_scale_bench(config, args.json, args.workdir)


def _bench(args: argparse.Namespace) -> int:
    if args.name == "geo":
        return _bench_geo(args)
    if args.name == "quality":
        from node.bench.quality import run as run_quality_bench

        # its own defaults (--warmup 15, --duration 30), like geo's
        return run_quality_bench(args)
    if args.name == "idle":
        from node.bench.idle import DEFAULT_DURATION_S, DEFAULT_SESSIONS, run_idle_bench

        return run_idle_bench(
            json_path=args.json,
            duration_s=DEFAULT_DURATION_S if args.duration is None else args.duration,
            warmup_s=3.0 if args.warmup is None else args.warmup,
            sessions=DEFAULT_SESSIONS if args.sessions is None else args.sessions,
        )
    # geo has defaults of its own; the other benches keep theirs
    if args.duration is None:
        args.duration = 5.0
    if args.warmup is None:
        args.warmup = 3.0
    if args.name == "vivaldi":
        from node.bench.vivaldi import run as run_vivaldi_bench

        return run_vivaldi_bench(args)
    if args.name == "forward":
        return _bench_forward(args)
    if args.name == "faults":
        from node.bench.faults import run as run_faults_bench

        return run_faults_bench(args)
    if args.name == "failover":
        from node.bench.failover import run as run_failover_bench

        return run_failover_bench(args)
    if args.name == "scale":
        return _bench_scale(args)
    if args.name == "relay":
        from node.bench.relay import run as run_relay_bench
        from node.bench.relay_cost import measure_relay_slope

        return run_relay_bench(args, slope=measure_relay_slope)
    if args.name == "join":
        from node.bench.join import run_join_bench

        return run_join_bench(
            json_path=args.json,
            duration_s=args.duration,
            nodes=args.nodes,
            clients=args.clients,
            bcrypt_cost=args.bcrypt_cost,
        )
    if args.name == "files":
        from node.bench.files import run_files_bench

        return run_files_bench(
            json_path=args.json,
            size_mb=args.size_mb,
            photos=args.photos,
            gallery_photos=args.gallery_photos,
        )
    if args.name == "codecs":
        from node.bench.codecs import run_codecs_bench

        return run_codecs_bench(json_path=args.json, duration_s=args.duration)
    if args.name == "happenings":
        from node.bench.happenings import run_happenings_bench

        return run_happenings_bench(
            json_path=args.json,
            reminders=args.reminders,
            nodes=args.nodes or 3,
            duration_s=args.duration,
        )
    from node.bench.api import run_api_bench

    return run_api_bench(
        json_path=args.json,
        duration_s=args.duration,
        concurrency=args.concurrency,
        bcrypt_cost=args.bcrypt_cost,
    )


def _bench_geo(args: argparse.Namespace) -> int:
    from node.bench.geo import run as run_geo_bench
    from node.local.netns import NetnsError, in_private_netns, reexec_in_private_netns

    # the lab builds its hosts only inside a private network namespace (as `sfumesh lab`)
    if not in_private_netns():
        try:
            reexec_in_private_netns()
        except NetnsError as error:
            print(f"sfumesh bench geo: {error}", file=sys.stderr)
            return 2
    setup_logging("WARNING")
    return run_geo_bench(args)


def _keygen(args: argparse.Namespace) -> int:
    print(new_key())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfumesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    node = commands.add_parser("node", help="run one node")
    node.add_argument("--config", type=Path, help="TOML config file (env overrides it)")
    node.add_argument("--host")
    node.add_argument("--port", type=int)
    node.add_argument("--node-name")
    node.add_argument("--region")
    node.add_argument("--data-dir", type=Path)
    node.set_defaults(run=_node)

    demo = commands.add_parser("demo", help="a local mesh with embedded services")
    demo.add_argument("--nodes", type=int, default=3, help="number of nodes")
    demo.add_argument("--smoke", action="store_true", help="run a self-check and exit 0/1")
    demo.add_argument("--port", type=int, default=8080, help="HTTP port of the first node")
    demo.add_argument("--data-dir", type=Path, default=Path(".data/demo"))
    demo.add_argument(
        "--turn",
        action="store_true",
        help="also start a local coturn; nodes hand its credentials to sessions",
    )
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="benchmarks named in the issues")
    bench.add_argument(
        "name",
        choices=[
            "api",
            "join",
            "codecs",
            "forward",
            "vivaldi",
            "relay",
            "files",
            "happenings",
            "failover",
            "faults",
            "geo",
            "scale",
            "quality",
            "idle",
        ],
    )
    bench.add_argument("--json", type=Path, help="also write the figures here")
    bench.add_argument(
        "--duration",
        type=float,
        help="seconds per phase (default 5); geo: seconds measured per scenario (default 30); "
        "idle: seconds per window (default 60)",
    )
    bench.add_argument(
        "--sessions", type=int, help="idle: idle WebSocket sessions in a room (default 100)"
    )
    bench.add_argument(
        "--concurrency", type=int, default=8, help="api: requests in flight during signups/logins"
    )
    bench.add_argument(
        "--bcrypt-cost",
        type=int,
        help="the nodes' bcrypt cost (default: api 12 as in production, join 4)",
    )
    bench.add_argument("--nodes", type=int, help="join, happenings: node processes (default 3)")
    bench.add_argument("--size-mb", type=float, default=200.0, help="files: the large upload")
    bench.add_argument("--photos", type=int, default=10, help="files: 12 MP photos uploaded")
    bench.add_argument(
        "--gallery-photos", type=int, default=5000, help="files: photos in the gallery room"
    )
    bench.add_argument(
        "--reminders", type=int, default=240, help="happenings: reminders due (default 240)"
    )
    bench.add_argument(
        "--clients",
        type=int,
        help="join: users with an open WebSocket, all joining (default 60); "
        "failover: clients on the killed node (default 4)",
    )
    forward = bench.add_argument_group("forward (the forwarding core against MediaRelay and Janus)")
    forward.add_argument(
        "--subscribers", default="1,4,16,32", help="forward: K values, comma-separated"
    )
    forward.add_argument(
        "--rounds",
        type=int,
        help="forward: rounds per K (default 2); vivaldi: Vivaldi rounds per node (default 1000);"
        " failover: kills, each on fresh nodes (default 1)",
    )
    forward.add_argument("--window", type=float, default=10.0, help="forward: window, s")
    forward.add_argument(
        "--warmup",
        type=float,
        help="forward, scale: warm-up, s (default 3); geo: after media flows (5)",
    )
    forward.add_argument(
        "--systems",
        help="forward: comma-separated of sfumesh, mediarelay, janus, janus-event-loops-1, "
        "sfumesh-simulcast, janus-layers-event-loops-1 (default: all; Janus only when "
        "node.bench.forward.janus is there)",
    )
    forward.add_argument(
        "--publishers",
        default="1,2,4,8",
        help="forward: P values of the ingest fit (P publishers, one subscriber each); 0: none",
    )
    forward.add_argument(
        "--ingest-systems",
        help="forward: systems of the ingest fit (default sfumesh,janus-event-loops-1; Janus "
        "only when node.bench.forward.janus is there)",
    )
    forward.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="forward: also draw every window's CPU against its packets/s, with the fits (PNG)",
    )
    forward.add_argument(
        "--max-mediarelay",
        type=int,
        help="forward: run MediaRelay only for K up to this (default: every K)",
    )
    forward.add_argument(
        "--video-size", default="640x360", help="forward, geo: the publishers' VP8 size, WxH"
    )
    forward.add_argument(
        "--workdir",
        type=Path,
        help="forward, scale, quality: keep logs and data here (default: a temp dir)",
    )
    scale = bench.add_argument_group("scale (how cost grows: one node per core, then the mesh)")
    scale.add_argument("--sizes", default="2,4,8", help="scale: room sizes, comma-separated")
    scale.add_argument(
        "--max-participants",
        type=int,
        default=64,
        help="scale: stop a ramp at this many participants on the node (default 64)",
    )
    scale.add_argument(
        "--max-nodes",
        type=int,
        default=16,
        help="scale: the mesh grows 4, 8, 16 ... up to this many nodes (0: no mesh part)",
    )
    scale.add_argument(
        "--people", type=int, default=4, help="scale: people per room in the mesh's joins"
    )
    scale.add_argument(
        "--start",
        type=int,
        help="scale: participants of a ramp's first step, in whole rooms (default: one room)",
    )
    scale.add_argument(
        "--step",
        type=int,
        help="scale: participants added per step, in whole rooms (default: 1, 2, 3, 5, 8 rooms)",
    )
    add_vivaldi_arguments(bench)
    add_relay_arguments(bench)
    add_failover_arguments(bench)
    add_faults_arguments(bench)
    add_quality_arguments(bench)
    add_geo_arguments(bench)
    bench.set_defaults(run=_bench)

    cluster = commands.add_parser(
        "cluster", help="the mesh as an operator sees it: members, rtt, rooms, sessions, relays"
    )
    cluster_cli.add_arguments(cluster)
    cluster.set_defaults(run=cluster_cli.run)

    lab = commands.add_parser(
        "lab", help="the WAN lab: far-apart regions emulated on this machine (shell, selftest)"
    )
    lab_cli.add_arguments(lab)
    lab.set_defaults(run=lab_cli.run)

    keygen = commands.add_parser("keygen", help="print a fresh token signing secret")
    keygen.set_defaults(run=_keygen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
