"""An idle keep-alive connection outlives the clients' own expiry (`server.KEEP_ALIVE_S`).

httpx stops reusing a pooled connection after 5 s idle, and hypercorn closed idle ones after
the same 5 s: a request sent just as the server closed failed ("Server disconnected without
sending a response", seen in the relay-loss lab under load). Here one raw HTTP/1.1
connection sends a request, stays idle past 5 s, and sends another on the same socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from node.local.launch import LocalNode

IDLE_S = 6.0  # past httpx's keepalive_expiry and hypercorn's default timeout (both 5 s)


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> bytes:
    writer.write(f"GET /api/ping HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), 10)
    return head.split(b"\r\n", 1)[0]


@pytest.mark.slow
async def test_an_idle_connection_is_kept_past_the_clients_expiry(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes)
    address = urlsplit(node.url)
    assert address.hostname is not None and address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        assert await _ping(reader, writer, address.netloc) == b"HTTP/1.1 200 "
        await asyncio.sleep(IDLE_S)
        assert await _ping(reader, writer, address.netloc) == b"HTTP/1.1 200 "
    finally:
        writer.close()
