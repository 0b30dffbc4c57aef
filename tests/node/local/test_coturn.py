"""Issue 18 item 1: a client that reaches the node's media only through coturn gets media
both ways, and coturn refuses expired and forged credentials.

The network, inside the test's private namespace (T):

    client namespace (C)            T
    10.78.0.2 ---- veth ---- 10.78.0.1    coturn listens here; the node's HTTP too
                             10.200.0.1   the node's media (ICE host candidates)
                             10.200.0.2   coturn's relay address

C has a route to 10.78.0.0/24 only, and T forwards nothing, so the client's packets reach
the node's HTTP (signalling) and coturn, never the node's media address: ICE can only
succeed over the client's relay candidate. The client runs in a thread moved into C (setns
moves one thread), so every socket it opens is C's. coturn is Debian's real `turnserver`,
configured by `node.local.coturn` as the README tells operators, and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aioice import stun, turn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.process import free_port
from node.config import load_settings
from node.lab.kernel import setns_net
from node.local.coturn import LocalCoturn, start_coturn
from node.local.launch import LocalNode, spawn_node, wait_ready
from node.local.netns import ensure_veth, in_private_netns, namespace_id
from node.local.participant import MediaPeer, open_socket, until
from node.media import adapter
from node.runtime.services import BackingServices
from node.runtime.turn import ice_servers, turn_password, turn_username
from tests.node.live_client import create_room, sign_up

T = TypeVar("T")

GATEWAY = "10.78.0.1"
CLIENT = "10.78.0.2"


@pytest.fixture
def client_netns() -> Iterator[str]:
    """A namespace (its /proc path) joined to this one by a veth pair, CLIENT <-> GATEWAY."""
    assert in_private_netns(), "run in a private network namespace (./scripts/test does)"
    own = namespace_id("self")
    holder = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while namespace_id(str(holder.pid)) in (None, own):
            assert time.monotonic() < deadline and holder.poll() is None, "no client namespace"
            time.sleep(0.01)
        path = f"/proc/{holder.pid}/ns/net"
        inside = ["nsenter", f"--net={path}", "--", "ip"]
        # A pair left by an earlier test goes with its namespace, but the kernel removes a
        # dead namespace's devices asynchronously: wait until the name is free.
        while subprocess.run(["ip", "link", "show", "turnc0"], capture_output=True).returncode == 0:
            subprocess.run(["ip", "link", "del", "turnc0"], capture_output=True)
            assert time.monotonic() < deadline, "turnc0 is still there"
            time.sleep(0.05)
        for command in (
            [
                "ip",
                "link",
                "add",
                "turnc0",
                "type",
                "veth",
                "peer",
                "name",
                "turnc1",
                "netns",
                str(holder.pid),
            ],
            ["ip", "addr", "add", f"{GATEWAY}/24", "dev", "turnc0"],
            ["ip", "link", "set", "turnc0", "up"],
            [*inside, "addr", "add", f"{CLIENT}/24", "dev", "turnc1"],
            [*inside, "link", "set", "turnc1", "up"],
            [*inside, "link", "set", "lo", "up"],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            assert done.returncode == 0, f"{' '.join(command)}: {done.stderr.strip()}"
        yield path
    finally:
        subprocess.run(["ip", "link", "del", "turnc0"], capture_output=True)
        holder.kill()
        holder.wait()


@pytest.fixture
def coturn(tmp_path: Path, client_netns: str) -> Iterator[LocalCoturn]:
    media_address = ensure_veth()  # 10.200.0.1: the node's media; .2: coturn's relay side
    server = start_coturn(
        tmp_path, listen=GATEWAY, relay="10.200.0.2", allowed_peers=[media_address]
    )
    yield server
    server.stop()


async def in_namespace(path: str, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`work()` run to completion on an event loop of its own, in a thread moved into the
    namespace at `path` (the test's loop goes on meanwhile)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            setns_net(path)
            result = asyncio.run(work())
        except BaseException as error:  # handed to the test as it is
            loop.call_soon_threadsafe(done.set_exception, error)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=run, name="client-netns", daemon=True).start()
    return await done


class _Nothing(asyncio.DatagramProtocol):
    pass


async def allocate(server: LocalCoturn, username: str, password: str, transport: str) -> str:
    """A TURN allocation on `server` with these credentials: its relayed address."""
    endpoint, _ = await turn.create_turn_endpoint(
        _Nothing,
        server_addr=(server.host, server.port),
        username=username,
        password=password,
        transport=transport,
    )
    try:
        host, port = endpoint.get_extra_info("sockname")
        return f"{host}:{port}"
    finally:
        endpoint.close()


@pytest.mark.slow
async def test_coturn_refuses_expired_and_forged_credentials(
    coturn: LocalCoturn, client_netns: str
) -> None:
    settings = load_settings(
        env={"SFUMESH_TURN_URLS": f'["{coturn.urls[0]}"]', "SFUMESH_TURN_SECRET": coturn.secret}
    ).turn
    [given] = ice_servers(settings, "session-a")
    expired_name = turn_username("session-a", int(time.time()) - 5)
    forged_name = turn_username("session-a", int(time.time()) + 3600)

    async def attempts() -> dict[str, str]:
        outcome = {}
        cases = {
            "given-udp": (given["username"], given["credential"], "udp"),
            "given-tcp": (given["username"], given["credential"], "tcp"),
            "expired": (expired_name, turn_password(coturn.secret, expired_name), "udp"),
            "forged": (forged_name, turn_password("not-" + coturn.secret, forged_name), "udp"),
            "tampered": (
                forged_name.replace("session-a", "session-b"),
                turn_password(coturn.secret, forged_name),
                "udp",
            ),
        }
        for name, (username, password, transport) in cases.items():
            try:
                outcome[name] = await allocate(coturn, username, password, transport)
            except stun.TransactionFailed as error:
                outcome[name] = str(error.response.attributes.get("ERROR-CODE"))
        return outcome

    # From the client's namespace, as a client behind the firewall would ask.
    outcome = await in_namespace(client_netns, attempts)
    assert outcome["given-udp"].startswith("10.200.0.2:"), outcome
    assert outcome["given-tcp"].startswith("10.200.0.2:"), outcome
    for refused in ("expired", "forged", "tampered"):
        assert outcome[refused].startswith("(401"), outcome


@pytest.mark.slow
async def test_a_client_reaching_the_node_only_through_turn_gets_media_both_ways(
    backing: BackingServices,
    token_keys: dict[str, str],
    tmp_path: Path,
    coturn: LocalCoturn,
    client_netns: str,
) -> None:
    node = spawn_node(
        backing,
        token_keys,
        name="node-turn",
        port=free_port(GATEWAY),
        data_dir=tmp_path,
        host=GATEWAY,
        serf=None,
        join=None,
        extra_env={
            "SFUMESH_DATABASE": f"test_{secrets.token_hex(6)}",
            "SFUMESH_BCRYPT_COST": "4",
            "SFUMESH_MEDIA_HOST_ADDRESSES": '["10.200.0.1"]',
            **coturn.node_env(),
        },
    )
    try:
        wait_ready(node)
        await _call_through_turn(node, client_netns)
    finally:
        node.stop()


async def _call_through_turn(node: LocalNode, client_netns: str) -> None:
    slug = f"turn-{secrets.token_hex(3)}"
    shared: dict[str, Any] = {}
    finished = threading.Event()

    async def client() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as http:
            user = await sign_up(http, node.url, "far")
            sock = await open_socket(node.url, await user.new_session(node.url))
            assert sock.ice_servers, "the node handed no TURN server"
            await user.join(sock, slug, node.url)
            peer = MediaPeer(sock, "far")
            try:
                await peer.start_publishing()
                shared["session"] = sock.session_id
                await until(
                    lambda: peer.decodes(shared["near"]), "far decodes near", 40, peer.describe
                )
                # Connected until the near side has decoded this one too.
                await asyncio.to_thread(finished.wait, 40)
                return {
                    "publish": adapter.nominated_candidate_types(peer.publish),
                    "subscribe": adapter.nominated_candidate_types(peer.subscribe),
                }
            finally:
                await peer.close()
                await sock.close()

    async with httpx.AsyncClient(timeout=30) as http:
        near_user = await sign_up(http, node.url, "near")
        await create_room(near_user, node.url, slug)
        near = await open_socket(node.url, await near_user.new_session(node.url))
        await near_user.join(near, slug, node.url)
        shared["near"] = near.session_id
        peer = MediaPeer(near, "near")
        far: asyncio.Future[dict[str, Any]] | None = None
        try:
            await peer.start_publishing()
            far = asyncio.ensure_future(in_namespace(client_netns, client))
            await until(lambda: "session" in shared or far.done(), "the far client joins", 40)
            if far.done():
                far.result()
            await until(
                lambda: peer.decodes(shared["session"]), "near decodes far", 40, peer.describe
            )
            finished.set()
            paths = await far
        finally:
            finished.set()
            if far is not None:
                # The client's own failure, if any, is the one worth reading.
                await asyncio.gather(far, return_exceptions=True)
            await peer.close()
            await near.close()
    # Both of the far client's connections travel over its relay candidate.
    assert paths["publish"] and all(local == "relay" for local, _ in paths["publish"]), paths
    assert paths["subscribe"] and all(local == "relay" for local, _ in paths["subscribe"]), paths


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` and its key (PEM files), as an ACME client would leave them."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert, pkey = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pkey.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, pkey


@pytest.mark.slow
async def test_turns_on_443_allocates_over_tls(tmp_path: Path) -> None:
    """`turns:host:443?transport=tcp`, as the README configures it: TURN inside TLS on the
    HTTPS port, what gets through firewalls that pass only HTTPS. The client checks the
    server's certificate (here a self-signed one it trusts)."""
    cert, pkey = self_signed(tmp_path, "turn.example.org")
    server = start_coturn(tmp_path, tls=(443, cert, pkey))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False  # the test dials 127.0.0.1, not the name
        username = turn_username("session-tls", int(time.time()) + 600)
        endpoint, _ = await turn.create_turn_endpoint(
            _Nothing,
            server_addr=(server.host, 443),
            username=username,
            password=turn_password(server.secret, username),
            transport="tcp",
            ssl=context,
        )
        try:
            assert endpoint.get_extra_info("sockname")[0] == "127.0.0.1"
        finally:
            endpoint.close()
        with pytest.raises(stun.TransactionFailed):
            forged = await turn.create_turn_endpoint(
                _Nothing,
                server_addr=(server.host, 443),
                username=username,
                password=turn_password("not-" + server.secret, username),
                transport="tcp",
                ssl=context,
            )
            forged[0].close()
    finally:
        server.stop()
