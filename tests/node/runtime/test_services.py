"""node/runtime/services.py: the embedded Redis and document store keep their data to their
owner. nx-27017 has no authentication, so it listens on no TCP port at all, only on a Unix
socket only its owner may open; data dirs are 0700, every file written is 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from pymongo import AsyncMongoClient
from redis.asyncio import Redis

from node.runtime.services import BackingServices
from node.runtime.store_server import LabOnlyError, lab_tcp_address

pytestmark = pytest.mark.slow

NOBODY = 65534


@pytest.fixture
def shared_parent() -> Iterator[Path]:
    """A world-enterable directory (as a home or /srv may be), so that only the services'
    own modes keep another user out."""
    path = Path(tempfile.mkdtemp(prefix="sfumesh-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def services(shared_parent: Path) -> Iterator[BackingServices]:
    old = os.umask(0o022)  # a usual umask: the services must not depend on the caller's
    try:
        started = BackingServices.start("", "", shared_parent / "services")
    finally:
        os.umask(old)
    try:
        yield started
    finally:
        started.stop()


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


#: a Python another user can run (the test's own may sit in root's home)
SYSTEM_PYTHON = "/usr/bin/python3"


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    python = SYSTEM_PYTHON
    return subprocess.run(
        [python, "-I", "-c", code], user=NOBODY, capture_output=True, text=True, check=False
    )


async def test_store_and_redis_files_are_private_and_the_store_has_no_tcp_port(
    services: BackingServices, shared_parent: Path
) -> None:
    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        services.mongodb_uri, serverSelectionTimeoutMS=10_000
    )
    await mongo["private"]["users"].insert_one({"email": "a@example.org", "hash": "$2b$..."})
    assert await mongo["private"]["users"].count_documents({}) == 1
    await mongo.close()
    redis = Redis.from_url(services.redis_url)
    await redis.set("k", "v")
    await redis.aclose()

    # the store is reached through its socket only: no TCP listener in its process
    assert services.store_socket is not None
    assert services.mongodb_uri.startswith("mongodb://%2F")
    assert Path(unquote(services.mongodb_uri.removeprefix("mongodb://").rstrip("/"))) == (
        services.store_socket.resolve()
    )
    store = next(child for child in services.children if child.name == "store")
    assert store.pid is not None
    assert not _socket_inodes(store.pid) & _listening_tcp_inodes()
    assert stat.S_IMODE(services.store_socket.stat().st_mode) == 0o600

    root = shared_parent / "services"
    assert stat.S_IMODE((root / "redis" / "redis.conf").stat().st_mode) == 0o600
    seen = {"dirs": 0, "files": 0}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        kind = "dirs" if path.is_dir() else "files"
        seen[kind] += 1
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        if kind == "dirs":
            assert mode == 0o700, f"{path} is {oct(mode)}"
    assert list(root.rglob("private.db")), "the store's database file"
    assert seen["files"] >= 6  # conf, logs, AOF, SQLite database and WAL, socket


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to act as another user) and a system Python",
)
async def test_another_local_user_cannot_reach_the_store(
    services: BackingServices, shared_parent: Path
) -> None:
    assert services.store_socket is not None
    sock = str(services.store_socket)
    connect = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({sock!r})\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    assert _as_nobody(connect).returncode == 13  # the 0700 data dirs keep it out
    # even with the directories opened up, the socket's own mode does
    for directory in (shared_parent / "services", services.store_socket.parent):
        directory.chmod(0o755)
    assert _as_nobody(connect).returncode == 13
    # and the database files are unreadable to others
    database = next((shared_parent / "services" / "store").rglob("admin.db"))
    database.parent.chmod(0o755)
    read = f"import sys\ntry:\n    open({str(database)!r}, 'rb')\nexcept PermissionError:\n"
    read += "    sys.exit(13)\n"
    assert _as_nobody(read).returncode == 13


def test_the_store_listens_on_tcp_only_at_a_lab_address_inside_the_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store has no authentication: its TCP mode (for the WAN lab, where nodes reach it
    over the emulated links) refuses any address outside 198.18.0.0/15 and any process
    outside a private namespace made by sfumesh; refused, it writes nothing."""
    assert lab_tcp_address("198.18.0.4:27017") == ("198.18.0.4", 27017)
    for address in ("127.0.0.1:27017", "0.0.0.0:27017", "10.0.0.1:27017", "198.20.0.1:27017"):
        with pytest.raises(LabOnlyError, match="only a lab address"):
            lab_tcp_address(address)
    with pytest.raises(LabOnlyError, match="bad port"):
        lab_tcp_address("198.18.0.4:0")
    for argv in (["--lab-tcp", "0.0.0.0:27017"], ["--lab-tcp", "198.18.0.4:27017"]):
        env = dict(os.environ)
        if argv[1].startswith("198.18"):
            env.pop("SFUMESH_PRIVATE_NETNS")  # outside the lab
        files = ["--data-dir", str(tmp_path / "db"), "--log-file", str(tmp_path / "store.log")]
        refused = subprocess.run(
            [sys.executable, "-m", "node.runtime.store_server", *argv, *files],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert refused.returncode == 2
        assert "--lab-tcp" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("SFUMESH_PRIVATE_NETNS")
    with pytest.raises(LabOnlyError, match="only inside the WAN lab"):
        lab_tcp_address("198.18.0.4:27017")
