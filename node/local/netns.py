"""A private network namespace for WebRTC tests and benches: nothing can leave the machine.

`scripts/test` already runs pytest in one (`unshare --net`, loopback up). A bench that needs
one re-executes itself through `reexec_in_private_netns`. Janus refuses to gather ICE
candidates on loopback and this kernel has no `dummy` links, so `ensure_veth` adds a veth
pair inside the namespace; it refuses to touch a namespace it did not make.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Final, NoReturn

#: set in the environment of a process started inside a namespace made by sfumesh
MARKER_ENV: Final = "SFUMESH_PRIVATE_NETNS"
VETH: Final = "veth0"
VETH_PEER: Final = "veth1"
VETH_ADDRESS: Final = "10.200.0.1"
VETH_PEER_ADDRESS: Final = "10.200.0.2"


class NetnsError(RuntimeError):
    """The private namespace cannot be made or changed."""


def namespace_id(pid: str) -> str | None:
    """The network namespace of process `pid` (or "self"), as the kernel names it."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def in_private_netns() -> bool:
    """True inside a namespace made by sfumesh (marker set and not the init namespace)."""
    if os.environ.get(MARKER_ENV) != "1":
        return False
    own, init = namespace_id("self"), namespace_id("1")
    return own is None or init is None or own != init


def private_netns_command(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped to run in a fresh network namespace with only loopback up."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        raise NetnsError("`unshare` and `ip` are needed (Debian: util-linux, iproute2)")
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    return [*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def reexec_in_private_netns(argv: Sequence[str] | None = None) -> NoReturn:
    """Replace this process by `argv` (default: this command) in a private namespace."""
    command = private_netns_command(argv or [sys.executable, *sys.argv])
    os.environ[MARKER_ENV] = "1"
    os.execvp(command[0], command)  # noqa: S606 (argv list, no shell parsing)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def ensure_veth() -> str:
    """A veth pair (VETH_ADDRESS, VETH_PEER_ADDRESS /24) in this private namespace; returns
    VETH_ADDRESS. Idempotent. Refuses outside a namespace sfumesh made."""
    if not in_private_netns():
        raise NetnsError(
            "refusing to add network links outside a private namespace made by sfumesh"
        )
    shown = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", VETH], capture_output=True, text=True, check=False
    )
    if shown.returncode == 0 and f" {VETH_ADDRESS}/" in shown.stdout:
        return VETH_ADDRESS
    _ip("link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER)
    _ip("addr", "add", f"{VETH_ADDRESS}/24", "dev", VETH)
    _ip("addr", "add", f"{VETH_PEER_ADDRESS}/24", "dev", VETH_PEER)
    _ip("link", "set", VETH, "up")
    _ip("link", "set", VETH_PEER, "up")
    return VETH_ADDRESS
