"""`sfumesh lab ...`: the WAN lab (issue 13). For now `selftest`, the emulator measured.

The lab builds its host namespaces inside a private network namespace; run from a normal
shell, the command re-executes itself in one (as the benches do), so the host's interfaces
are never touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from node.lab.namespaces import LabError, in_private_netns
from node.lab.selftest import SelftestConfig, format_table, run_selftest
from node.local.netns import NetnsError, reexec_in_private_netns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="lab_command", required=True)
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
    selftest.set_defaults(lab_run=_selftest)


def run(args: argparse.Namespace) -> int:
    if not in_private_netns():
        try:
            reexec_in_private_netns()
        except NetnsError as error:
            print(f"sfumesh lab: {error}", file=sys.stderr)
            return 2
    code: int = args.lab_run(args)
    return code


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
