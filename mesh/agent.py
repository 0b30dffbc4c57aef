"""The Serf agent beside a node: its config file, its process, readiness and restarts.

`SerfAgentConfig` holds what is specific to one node (name, addresses, secrets, tags, snapshot,
size limits) and writes the JSON file Serf reads: the repository's `serf.json` template for
the shared settings, with the node's own values on top, mode 0600 (it holds `encrypt_key` and
`rpc_auth`). Serf refuses unknown keys, so they are refused here first, with a clear message.

`SerfAgent` runs `serf agent -config-file=...` as a `ManagedProcess` (stopped by PID), waits
until its RPC answers, and watches it: an agent that dies is logged (`serf.agent_died`) and
restarted with backoff (`serf.agent_restarted`); after too many deaths in a window it gives up
(`serf.agent_gave_up`) and stays not-ready, so the node reports not-ready. With
`snapshot_path` a restarted agent rejoins the cluster by itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from mesh.process import ManagedProcess, ServiceError, is_loopback, private_dir
from mesh.serf import Member, SerfAuthError, SerfClient, SerfConnectionError, SerfError

log = logging.getLogger(__name__)

#: the project's `serf.json`, shipped in the package as `mesh/data/serf.json` (a link to the
#: checkout's top-level file, copied into wheels), found as package data
DEFAULT_TEMPLATE = Path(str(resources.files("mesh") / "data" / "serf.json"))
# Every key Serf 0.8/0.9 reads from a config file (command/agent/config.go).
SERF_CONFIG_KEYS = frozenset(
    "advertise bind broadcast_timeout disable_coordinates disable_name_resolution discover "
    "enable_compression enable_syslog encrypt_key event_handlers interface keyring_file "
    "leave_on_terminate log_level mdns node_name profile protocol query_response_size_limit "
    "query_size_limit reconnect_interval reconnect_timeout rejoin_after_leave replay_on_join "
    "retry_interval retry_join retry_max_attempts role rpc_addr rpc_auth skip_leave_on_interrupt "
    "snapshot_path start_join statsd_addr statsite_addr syslog_facility tags tags_file "
    "tombstone_timeout user_event_size_limit".split()
)
# Keys that name one node: taken from SerfAgentConfig, never from the shared template.
NODE_KEYS = frozenset(
    {"node_name", "bind", "advertise", "rpc_addr", "rpc_auth", "encrypt_key", "tags"}
    | {"snapshot_path", "tags_file", "keyring_file"}
)
USER_EVENT_SIZE_MAX = 9216  # Serf refuses a larger user_event_size_limit
TAGS_ENCODED_MAX = 512  # memberlist's meta limit: the msgpack-encoded tags plus one magic byte


def serf_keygen() -> str:
    """A new gossip encryption key, as `serf keygen` prints it (base64 of 32 random bytes)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


class SerfAgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(min_length=1, max_length=128)
    bind: str = "127.0.0.1:7946"
    advertise: str = ""
    rpc_addr: str = "127.0.0.1:7373"
    rpc_auth: SecretStr = SecretStr("")
    encrypt_key: SecretStr = SecretStr("")
    # Only a demo on one machine may gossip in clear text.
    require_encryption: bool = True
    tags: dict[str, str] = Field(default_factory=dict)
    snapshot_path: Path | None = None
    # None: the template's value (or Serf's default).
    rejoin_after_leave: bool | None = None
    retry_join: list[str] | None = None
    log_level: str | None = None
    user_event_size_limit: int | None = Field(default=None, gt=0, le=USER_EVENT_SIZE_MAX)
    query_size_limit: int | None = Field(default=None, gt=0)
    query_response_size_limit: int | None = Field(default=None, gt=0)
    template: Path | None = DEFAULT_TEMPLATE

    @field_validator("encrypt_key")
    @classmethod
    def _key_shape(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw:
            try:
                decoded = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("encrypt_key must be base64 (`serf keygen`)") from None
            if len(decoded) not in (16, 24, 32):
                raise ValueError("encrypt_key must decode to 16, 24 or 32 bytes")
        return value

    @field_validator("bind", "rpc_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _checks(self) -> SerfAgentConfig:
        if self.require_encryption and not self.encrypt_key.get_secret_value():
            raise ValueError("encrypt_key is required outside the demo (generate one: serf keygen)")
        encoded = len(msgpack.packb(self.tags)) + 1
        if encoded > TAGS_ENCODED_MAX:
            raise ValueError(f"tags take {encoded} bytes encoded; Serf allows {TAGS_ENCODED_MAX}")
        return self

    def serf_json(self) -> dict[str, Any]:
        """The template's shared settings with this node's values on top."""
        merged: dict[str, Any] = {}
        if self.template is not None and self.template.exists():
            try:
                shared = json.loads(self.template.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"Serf template {self.template}: {error}") from error
            unknown = sorted(set(shared) - SERF_CONFIG_KEYS)
            if unknown:
                raise ValueError(f"Serf template {self.template}: unknown keys {unknown}")
            merged = {k: v for k, v in shared.items() if k not in NODE_KEYS}
        merged.update(node_name=self.node_name, bind=self.bind, rpc_addr=self.rpc_addr)
        merged["tags"] = dict(self.tags)
        optional: dict[str, Any] = {
            "advertise": self.advertise or None,
            "rpc_auth": self.rpc_auth.get_secret_value() or None,
            "encrypt_key": self.encrypt_key.get_secret_value() or None,
            "snapshot_path": str(self.snapshot_path) if self.snapshot_path else None,
            "rejoin_after_leave": self.rejoin_after_leave,
            "retry_join": self.retry_join,
            "log_level": self.log_level,
            "user_event_size_limit": self.user_event_size_limit,
            "query_size_limit": self.query_size_limit,
            "query_response_size_limit": self.query_response_size_limit,
        }
        merged.update({key: value for key, value in optional.items() if value is not None})
        return merged

    def write(self, path: Path) -> Path:
        """Write the config file, readable by its owner only (it holds secrets)."""
        private_dir(path.parent)
        if self.snapshot_path is not None:
            private_dir(self.snapshot_path.parent, tighten=False)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.serf_json(), out, indent=2)
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        return path


class SerfAgent:
    """One `serf agent` child: started, watched, restarted when it dies, stopped by PID."""

    def __init__(
        self,
        config: SerfAgentConfig,
        data_dir: Path,
        *,
        binary: str = "serf",
        restart: bool = True,
        max_restarts: int = 5,
        restart_window_s: float = 300.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        ready_timeout_s: float = 20.0,
        peer_refresh_s: float = 15.0,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.config_path = data_dir / f"serf-{config.node_name}.json"
        self.log_path = data_dir / f"serf-{config.node_name}.log"
        self.binary = binary
        self.restart = restart
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff = (backoff_initial_s, backoff_max_s)
        self.ready_timeout_s = ready_timeout_s
        self.peer_refresh_s = peer_refresh_s
        self.on_change = on_change
        self.process: ManagedProcess | None = None
        self.ready = False
        self.gave_up = False
        self.restarts = 0
        self._deaths: list[float] = []
        self._peers: list[str] = []
        self._watch: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def peers(self) -> list[str]:
        """Bind addresses of the other alive members, as last seen (refreshed while alive)."""
        return list(self._peers)

    @property
    def rpc_addr(self) -> str:
        return self.config.rpc_addr

    def client(self, **options: Any) -> SerfClient:
        """A client for this agent's RPC (not connected yet)."""
        return SerfClient(self.rpc_addr, self.config.rpc_auth.get_secret_value(), **options)

    async def start(self) -> None:
        """Start the agent and wait until its RPC answers; raises ServiceError if it cannot."""
        # Serf's RPC sends queries as any node and makes the agent leave: off loopback, only
        # with a key.
        if not is_loopback(self.config.rpc_addr) and not self.config.rpc_auth.get_secret_value():
            raise ServiceError(
                f"serf agent {self.config.node_name}: rpc_auth is required when rpc_addr "
                f"({self.config.rpc_addr}) is not a loopback address"
            )
        binary = shutil.which(self.binary)
        if binary is None:
            raise ServiceError(f"{self.binary} is not installed (Debian package `serf`)")
        self.config.write(self.config_path)
        self.process = ManagedProcess(
            f"serf:{self.config.node_name}",
            [binary, "agent", f"-config-file={self.config_path}"],
            self.log_path,
            # a node killed outright must not leave its agent behind, alive in the cluster
            die_with_parent=True,
        )
        self.gave_up = False
        await self._launch()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_loop())

    async def _launch(self) -> None:
        assert self.process is not None
        self.process.start()
        try:
            await self._wait_rpc()
        except BaseException:
            await asyncio.to_thread(self.process.stop)
            raise
        await self._set_ready(True)

    async def _wait_rpc(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.process.exit_code() is not None:
                raise ServiceError(
                    f"serf agent exited while starting: {self.process.death_report()}"
                )
            try:
                async with self.client(reconnect=False, timeout=2.0) as serf:
                    await serf.stats()
                return
            except SerfAuthError as error:
                raise ServiceError(f"serf agent refused our rpc_auth: {error}") from error
            except SerfConnectionError:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"serf agent RPC {self.rpc_addr} not answering after "
                        f"{self.ready_timeout_s}s:\n{self.process.log_tail()}"
                    ) from None
                await asyncio.sleep(0.1)

    async def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            if self.on_change is not None:
                await self.on_change(ready)

    async def _watch_loop(self, interval: float = 0.5) -> None:
        next_refresh = 0.0
        while True:
            await asyncio.sleep(interval)
            process = self.process
            if process is None or process.stopping:
                continue
            if process.exit_code() is None:
                if self.ready and time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.peer_refresh_s
                    await self._refresh_peers()
                continue
            await self._on_death(process)
            if self.gave_up:
                return

    async def _on_death(self, process: ManagedProcess) -> None:
        await self._set_ready(False)
        log.error(
            "serf.agent_died",
            extra={
                "node": self.config.node_name,
                "pid": process.pid,
                "code": process.exit_code(),
                "log_tail": process.log_tail(),
                "restart": self.restart,
            },
        )
        while True:
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < self.restart_window_s] + [now]
            if not self.restart or len(self._deaths) > self.max_restarts:
                self.gave_up = True
                log.error(
                    "serf.agent_gave_up",
                    extra={"node": self.config.node_name, "deaths": len(self._deaths)},
                )
                return
            initial, limit = self.backoff
            await asyncio.sleep(min(initial * 2 ** (len(self._deaths) - 1), limit))
            try:
                await self._launch()
            except ServiceError as error:  # counts as one more death
                log.error(
                    "serf.agent_restart_failed",
                    extra={"node": self.config.node_name, "error": str(error)},
                )
                continue
            self.restarts += 1
            log.warning(
                "serf.agent_restarted",
                extra={"node": self.config.node_name, "pid": self.pid, "restarts": self.restarts},
            )
            await self._rejoin()
            return

    async def _refresh_peers(self) -> None:
        """Remember the other alive members, to rejoin them after a restart if need be."""
        try:
            async with self.client(reconnect=False, timeout=5.0) as serf:
                members = await serf.members()
        except SerfError:
            return
        name = self.config.node_name
        peers = [_join_addr(m) for m in members if m.name != name and m.status == "alive"]
        if peers:
            self._peers = peers

    async def _rejoin(self) -> None:
        """After a restart the snapshot normally brings the cluster back; Serf flushes it only
        on a write >0.5 s after the previous one, so an agent killed soon after joining may
        come back alone: then join the peers seen last."""
        if not self._peers:
            return
        try:
            async with self.client(reconnect=False, timeout=10.0) as serf:
                others = [m for m in await serf.members() if m.name != self.config.node_name]
                if any(m.status == "alive" for m in others):
                    return
                joined = await serf.join(self._peers)
        except SerfError as error:
            log.warning(
                "serf.agent_rejoin_failed",
                extra={"node": self.config.node_name, "error": str(error)},
            )
            return
        log.info("serf.agent_rejoined", extra={"node": self.config.node_name, "joined": joined})

    async def stop(self, leave: bool = False, grace_s: float = 10.0) -> None:
        """Stop watching, then stop the agent: a graceful `leave` first when asked (the others
        see it `left` at once, not `failed` after the detection delay), SIGTERM by PID after."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        process = self.process
        if process is None or process.exit_code() is not None:
            await self._set_ready(False)
            return
        process.stopping = True
        if leave:
            try:
                async with self.client(reconnect=False, timeout=grace_s) as serf:
                    await serf.leave()
            except SerfError as error:
                log.warning(
                    "serf.leave_failed", extra={"node": self.config.node_name, "error": str(error)}
                )
            # The agent shuts itself down after a leave; give it the time to.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_exited(process), grace_s)
        await asyncio.to_thread(process.stop, grace_s)
        await self._set_ready(False)
        log.info("serf.agent_stopped", extra={"node": self.config.node_name, "leave": leave})


def _join_addr(member: Member) -> str:
    return (
        f"[{member.addr}]:{member.port}" if ":" in member.addr else f"{member.addr}:{member.port}"
    )


async def _exited(process: ManagedProcess, interval: float = 0.1) -> None:
    while process.exit_code() is None:  # noqa: ASYNC110 (a child process has no event to wait on)
        await asyncio.sleep(interval)
