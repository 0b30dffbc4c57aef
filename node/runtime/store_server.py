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
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.process import PRIVATE_UMASK, private_dir

log = logging.getLogger("sfumesh.store")


async def serve(socket_path: Path, handler: Any) -> None:
    """Answer MongoDB wire protocol clients on `socket_path` until SIGTERM/SIGINT."""
    from nx_27017.server import handle_client

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_client(reader, writer, handler)

    server = await asyncio.start_unix_server(on_client, path=str(socket_path))
    # the umask made it 0700 already; connecting needs only read and write
    os.chmod(socket_path, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("store.listening socket=%s", socket_path)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--log-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=args.log_file,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from nx_27017.handler import NeoSQLiteHandler

    # as `nx-27017 --data-dir DIR` builds it: one SQLite file per database, WAL journal
    handler = NeoSQLiteHandler(data_dir=str(private_dir(args.data_dir)), journal_mode="WAL")
    private_dir(args.socket.parent)
    args.socket.unlink(missing_ok=True)  # left by a store that was killed
    try:
        asyncio.run(serve(args.socket, handler))
    finally:
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
