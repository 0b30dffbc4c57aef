"""A local coturn (Debian's `turnserver`) for `sfumesh demo --turn` and the TURN tests.

The configuration is the one the README gives operators (`coturn_config`), with local
addresses: `use-auth-secret` with the nodes' `turn.secret`, no static users, peers on
loopback, private and other special ranges refused unless listed in `allowed_peers` (the
nodes' media addresses), so the relay cannot be used to reach anything else on the
server's networks. The secret goes in a 0600 config file, never on the command line. The
process is ours: started here, stopped by its PID.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh.process import ManagedProcess, ServiceError, free_port, private_dir, private_file

#: Peer ranges coturn refuses to relay to (RFC 6890 special-purpose and private ranges):
#: without them a TURN credential would reach the TURN host's own private networks.
DENIED_PEER_RANGES = (
    "0.0.0.0-0.255.255.255",
    "10.0.0.0-10.255.255.255",
    "100.64.0.0-100.127.255.255",
    "127.0.0.0-127.255.255.255",
    "169.254.0.0-169.254.255.255",
    "172.16.0.0-172.31.255.255",
    "192.0.0.0-192.0.0.255",
    "192.0.2.0-192.0.2.255",
    "192.88.99.0-192.88.99.255",
    "192.168.0.0-192.168.255.255",
    "198.18.0.0-198.19.255.255",
    "198.51.100.0-198.51.100.255",
    "203.0.113.0-203.0.113.255",
    "240.0.0.0-255.255.255.255",
    "::1",
    "64:ff9b::-64:ff9b::ffff:ffff",
    "::ffff:0.0.0.0-::ffff:255.255.255.255",
    "100::-100::ffff:ffff:ffff:ffff",
    "2001::-2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
    "2002::-2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
)


def coturn_config(
    *,
    secret: str,
    realm: str,
    listening_ips: Sequence[str],
    relay_ips: Sequence[str],
    port: int = 3478,
    min_port: int = 49160,
    max_port: int = 49200,
    allowed_peers: Sequence[str] = (),
    tls_port: int | None = None,
    cert: str = "",
    pkey: str = "",
    pidfile: str = "",
    userdb: str = "",
) -> str:
    """turnserver.conf for sfumesh nodes whose `turn.secret` is `secret`."""
    lines = [
        "# coturn for sfumesh: TURN REST credentials (use-auth-secret) made by the nodes",
        *(f"listening-ip={ip}" for ip in listening_ips),
        f"listening-port={port}",
        *(f"relay-ip={ip}" for ip in relay_ips),
        f"min-port={min_port}",
        f"max-port={max_port}",
        "use-auth-secret",
        f"static-auth-secret={secret}",
        f"realm={realm}",
        "fingerprint",
        "no-cli",
        "no-multicast-peers",
        "no-software-attribute",
        "stale-nonce=600",
        *(f"denied-peer-ip={r}" for r in DENIED_PEER_RANGES),
        *(f"allowed-peer-ip={ip}" for ip in allowed_peers),
        "log-file=stdout",
        "simple-log",
    ]
    if tls_port is None:
        lines += ["no-tls", "no-dtls"]
    else:
        lines += [f"tls-listening-port={tls_port}", f"cert={cert}", f"pkey={pkey}", "no-dtls"]
    if any(is_loopback_address(ip) for ip in allowed_peers):
        # A demo on one machine: the nodes' media is on loopback (refused otherwise).
        lines.append("allow-loopback-peers")
    if pidfile:
        lines.append(f"pidfile={pidfile}")
    if userdb:
        # Its own (empty) user database, not the system's /var/lib/turn/turndb.
        lines.append(f"userdb={userdb}")
    return "\n".join(lines) + "\n"


def is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass
class LocalCoturn:
    """A running coturn and what nodes need to hand out its credentials."""

    process: ManagedProcess
    host: str
    port: int
    secret: str
    realm: str

    @property
    def urls(self) -> list[str]:
        return [
            f"turn:{self.host}:{self.port}?transport=udp",
            f"turn:{self.host}:{self.port}?transport=tcp",
        ]

    def node_env(self) -> dict[str, str]:
        """The environment that makes a node hand out this server's credentials."""
        return {"SFUMESH_TURN_URLS": json.dumps(self.urls), "SFUMESH_TURN_SECRET": self.secret}

    def stop(self) -> None:
        self.process.stop()


def start_coturn(
    data_dir: Path,
    *,
    listen: str = "127.0.0.1",
    relay: str | None = None,
    allowed_peers: Sequence[str] = (),
    port: int | None = None,
    secret: str | None = None,
    realm: str = "sfumesh.local",
    tls: tuple[int, Path, Path] | None = None,
) -> LocalCoturn:
    """Start coturn listening on `listen` (UDP and TCP), relaying from `relay` (default the
    same address) to the nodes' media addresses `allowed_peers`; wait until it listens.
    `tls` = (port, certificate, key): TURN over TLS (`turns:`) there too."""
    binary = shutil.which("turnserver")
    if binary is None:
        raise ServiceError("coturn is not installed (Debian: apt-get install coturn)")
    directory = private_dir(data_dir / "coturn")
    port = port or free_port(listen)
    secret = secret or secrets.token_urlsafe(32)
    # Relay ports near the listening port's, so parallel servers rarely share a range.
    low = 20000 + (port % 2000) * 20
    config = coturn_config(
        secret=secret,
        realm=realm,
        listening_ips=[listen],
        relay_ips=[relay or listen],
        port=port,
        min_port=low,
        max_port=low + 19,
        allowed_peers=allowed_peers,
        pidfile=str(directory / "turnserver.pid"),
        userdb=str(directory / "turndb"),
        tls_port=None if tls is None else tls[0],
        cert="" if tls is None else str(tls[1]),
        pkey="" if tls is None else str(tls[2]),
    )
    conf = private_file(directory / "turnserver.conf", config)
    process = ManagedProcess(
        "coturn", [binary, "-c", str(conf)], directory / "turnserver.log", die_with_parent=True
    )
    process.start()
    process.wait_port(listen, port)
    if tls is not None:
        process.wait_port(listen, tls[0])
    return LocalCoturn(process, listen, port, secret, realm)
