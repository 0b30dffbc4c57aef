"""The embedded document store (nx-27017) served on a Unix socket, not a TCP port.

nx-27017 (pinned 0.8.1) has no authentication at all: no users, no SASL/SCRAM, every
command answered for whoever connects; and it listens only on TCP, where any local user (or
anyone, off loopback) could read the users' emails and password hashes. So the node runs it
here, as its own child process: nx-27017's command handler and its per-connection loop
(`nx_27017.server.handle_client`), behind `asyncio.start_unix_server` on a socket inside a
0700 directory, the socket itself 0600, and a umask of 077 for every file it writes (the
SQLite databases, WAL and journal files, its log). Only the OS user running the node can
connect; the driver reaches it with `mongodb://<percent-encoded socket path>`.

Run as `python -m node.runtime.store_server --socket PATH --data-dir DIR --log-file FILE`
(`node.runtime.services` does). SIGTERM closes the socket and exits 0.

The WAN lab only (`sfumesh lab`, `node.lab.cluster`): `--lab-tcp 198.18.x.y:PORT` instead of
`--socket`. There the store is a host of its own and the nodes reach it through the emulated
links, which a Unix socket cannot cross. The store still has no authentication, so this mode
refuses any address outside the lab's range (198.18.0.0/15, RFC 2544 benchmarking) and any
process not started inside a private network namespace made by sfumesh (marker
SFUMESH_PRIVATE_NETNS=1, a network namespace other than PID 1's): there, only the lab's own
namespaces have a route to it, never the machine's interfaces.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.process import PRIVATE_UMASK, private_dir

log = logging.getLogger("sfumesh.store")

#: the lab's address range (node.lab.topology.LAB_NETWORK; repeated: node.runtime is below
#: node.lab and may not import it)
LAB_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")


class LabOnlyError(ValueError):
    """TCP was asked for outside the WAN lab."""


def _netns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def lab_tcp_address(value: str) -> tuple[str, int]:
    """`value` ("198.18.x.y:port") as (host, port), or LabOnlyError: only an address of the
    lab's range, and only inside a private namespace made by sfumesh."""
    host, _, port = value.rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise LabOnlyError(f"--lab-tcp {value!r}: not IPv4 host:port") from None
    if address not in LAB_NETWORK:
        raise LabOnlyError(f"--lab-tcp {value!r}: only a lab address ({LAB_NETWORK}) is allowed")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise LabOnlyError(f"--lab-tcp {value!r}: bad port")
    own, init = _netns("self"), _netns("1")
    if os.environ.get("SFUMESH_PRIVATE_NETNS") != "1" or (own is not None and own == init):
        raise LabOnlyError(
            "--lab-tcp: only inside the WAN lab's private network namespace (sfumesh lab)"
        )
    return str(address), int(port)


async def serve(socket_path: Path | None, handler: Any, tcp: tuple[str, int] | None = None) -> None:
    """Answer MongoDB wire protocol clients on `socket_path` (or, in the lab, on `tcp`)
    until SIGTERM/SIGINT."""
    from nx_27017.server import handle_client

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_client(reader, writer, handler)

    if socket_path is not None:
        server = await asyncio.start_unix_server(on_client, path=str(socket_path))
        # the umask made it 0700 already; connecting needs only read and write
        os.chmod(socket_path, 0o600)
    elif tcp is not None:
        server = await asyncio.start_server(on_client, host=tcp[0], port=tcp[1])
    else:
        raise ValueError("a socket path or a lab TCP address")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("store.listening socket=%s tcp=%s", socket_path, tcp)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path)
    where.add_argument("--lab-tcp", help="the WAN lab only: 198.18.x.y:PORT")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--log-file", type=Path, required=True)
    args = parser.parse_args(argv)
    tcp = None
    if args.lab_tcp is not None:
        try:
            tcp = lab_tcp_address(args.lab_tcp)
        except LabOnlyError as error:
            parser.error(str(error))  # exits 2
    logging.basicConfig(
        filename=args.log_file,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from nx_27017.handler import NeoSQLiteHandler

    # as `nx-27017 --data-dir DIR` builds it: one SQLite file per database, WAL journal
    handler = NeoSQLiteHandler(data_dir=str(private_dir(args.data_dir)), journal_mode="WAL")
    if tcp is not None:
        asyncio.run(serve(None, handler, tcp))
        return 0
    private_dir(args.socket.parent)
    args.socket.unlink(missing_ok=True)  # left by a store that was killed
    try:
        asyncio.run(serve(args.socket, handler))
    finally:
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
