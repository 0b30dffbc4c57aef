"""`sfumesh lab ...`: the WAN lab (issue 13).

* `sfumesh lab [--topology FILE] [--data-dir DIR]`: the topology's hosts, Redis, the store
  and the nodes (with their Serf agents, joined over the emulated links) running until
  Ctrl-C or SIGTERM; each node's URL printed.
* `sfumesh lab shell HOST [-- CMD...]`: a command (default a shell) inside a host of the
  lab running with that data dir.
* `sfumesh lab selftest`: the emulator measured.

The lab builds its host namespaces inside a private network namespace; run from a normal
shell, `lab` and `lab selftest` re-execute themselves in one (as the benches do), so the
host's interfaces are never touched. `lab shell` does not: it enters a running lab's host.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from mesh.process import ServiceError
from node.lab.cluster import LabCluster, running_hosts
from node.lab.namespaces import LabError, enter_command
from node.lab.selftest import SelftestConfig, format_table, run_selftest
from node.lab.topology import TopologyError
from node.local.netns import MARKER_ENV, NetnsError, in_private_netns, reexec_in_private_netns
from node.log import setup_logging

DEFAULT_DATA_DIR = Path(".data/lab")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--topology", type=Path, help="a topology file (default: the one shipped, default.toml)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"logs, databases and the running lab's state (default {DEFAULT_DATA_DIR})",
    )
    parser.set_defaults(lab_run=_lab, lab_private=True)
    commands = parser.add_subparsers(dest="lab_command")
    shell = commands.add_parser(
        "shell", help="run a command (default a shell) inside a host of the running lab"
    )
    shell.add_argument("host", help="a host of the topology, e.g. eu-peer")
    shell.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    # SUPPRESS: `lab --data-dir D shell HOST` keeps D (a subparser's default would win)
    shell.add_argument(
        "--data-dir", type=Path, default=argparse.SUPPRESS, help="the running lab's data dir"
    )
    shell.set_defaults(lab_run=_shell, lab_private=False)
    selftest = commands.add_parser(
        "selftest", help="measure the link emulator: delay error, loss, rate, CPU per packet"
    )
    defaults = SelftestConfig()
    selftest.add_argument("--json", type=Path, help="also write the figures here")
    selftest.add_argument(
        "--duration", type=float, default=defaults.duration_s, help="seconds per phase"
    )
    selftest.add_argument("--rate", type=float, default=defaults.rate_pps, help="packets/s")
    selftest.add_argument("--size", type=int, default=defaults.size, help="UDP payload, bytes")
    selftest.add_argument(
        "--delay", type=float, default=defaults.delay_ms, help="one-way delay, ms"
    )
    selftest.add_argument("--loss", type=float, default=defaults.loss, help="loss fraction")
    selftest.add_argument("--cap", type=float, default=defaults.cap_mbps, help="rate cap, Mbit/s")
    selftest.add_argument(
        "--realtime",
        action="store_true",
        help="run the emulator with SCHED_FIFO priority (if allowed)",
    )
    selftest.set_defaults(lab_run=_selftest, lab_private=True)


def run(args: argparse.Namespace) -> int:
    if args.lab_private and not in_private_netns():
        try:
            reexec_in_private_netns()
        except NetnsError as error:
            print(f"sfumesh lab: {error}", file=sys.stderr)
            return 2
    code: int = args.lab_run(args)
    return code


class _Stop(Exception):
    """SIGTERM: end the lab as Ctrl-C does."""


def _lab(args: argparse.Namespace) -> int:
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    data_dir = args.data_dir.resolve()
    try:
        hosts = running_hosts(data_dir)
    except LabError:
        hosts = {}
    if hosts:
        print(f"sfumesh lab: a lab is already running with data dir {data_dir}", file=sys.stderr)
        return 2
    try:
        cluster = LabCluster.from_file(args.topology, data_dir, realtime=True)
    except (TopologyError, LabError, OSError) as error:
        print(f"sfumesh lab: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with cluster:
            _print_running(cluster, args.data_dir)
            while not stop.wait(0.5):
                for child in cluster.dead():
                    print(f"sfumesh lab: {child.death_report()}", file=sys.stderr)
                    return 1
    except (LabError, ServiceError) as error:
        print(f"sfumesh lab: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("sfumesh lab: stopped", file=sys.stderr)
    return 0


def _print_running(cluster: LabCluster, data_dir: Path) -> None:
    topology = cluster.topology
    print(f"sfumesh lab is running ({len(topology.hosts)} hosts, realtime {cluster.lab.realtime})")
    for name, host in topology.hosts.items():
        url = cluster.urls.get(name)
        where = f"{url}/" if url else str(host.address)
        print(f"  {name:<12} {host.role.value:<7} {host.region:<8} {where}")
    print(f"  logs: {data_dir}/ (nodes/, redis/, store/)")
    print("  inside a host: sfumesh lab shell HOST [-- CMD...]  (e.g. curl a node from a client)")
    print("  Ctrl-C stops it.", flush=True)


def _shell(args: argparse.Namespace) -> int:
    try:
        hosts = running_hosts(args.data_dir.resolve())
    except LabError as error:
        print(f"sfumesh lab shell: {error}", file=sys.stderr)
        return 2
    if args.host not in hosts:
        names = ", ".join(sorted(hosts))
        print(f"sfumesh lab shell: no host {args.host!r} (hosts: {names})", file=sys.stderr)
        return 2
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        command = [os.environ.get("SHELL") or "/bin/sh"]
    try:
        argv = enter_command(hosts[args.host], command)
    except OSError as error:
        print(f"sfumesh lab shell: {error}", file=sys.stderr)
        return 2
    os.environ[MARKER_ENV] = "1"  # inside the lab: sfumesh commands may run there
    os.execvp(argv[0], argv)  # noqa: S606 (argv list, no shell parsing)


def _selftest(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.duration <= 0 or not 0 <= args.loss < 1 or args.cap <= 0:
        print("sfumesh lab selftest: rate, duration and cap > 0, loss in [0, 1)", file=sys.stderr)
        return 2
    if not 16 <= args.size <= 1400:
        print("sfumesh lab selftest: --size within [16, 1400]", file=sys.stderr)
        return 2
    config = SelftestConfig(
        rate_pps=args.rate,
        size=args.size,
        delay_ms=args.delay,
        loss=args.loss,
        cap_mbps=args.cap,
        duration_s=args.duration,
        realtime=args.realtime,
    )
    try:
        result = run_selftest(config)
    except LabError as error:
        print(f"sfumesh lab selftest: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the lab is already torn down (its `with` block)
        print("sfumesh lab selftest: interrupted", file=sys.stderr)
        return 130
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0
