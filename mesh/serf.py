"""An asyncio client for Serf's RPC protocol, over one TCP connection.

The wire format (hashicorp/serf command/agent/ipc.go): back-to-back msgpack objects. A request
is a header `{Command, Seq}` plus a body for most commands; a reply is a header `{Seq, Error}`,
followed by a body only for the commands in `_BODY_COMMANDS` (even when Error is set, except
for the errors Serf sends before dispatching). `stream` and `query` answer once with a bare
header, then send `header + record` pairs with the same Seq until stopped (a query ends with a
`done` record, at its timeout; `stop` does not end a query on the agent's side).

One reader task routes every header to the waiting call or subscription by Seq, so calls,
event streams and query results share the connection: a query that arrives on a stream is
answered with `respond` on that same connection, as Serf requires. A lost connection fails the
pending calls and running queries with `SerfConnectionError`, then reconnects with exponential
backoff and jitter, re-does handshake and auth and resubscribes the open event streams (events
sent while disconnected are lost; query IDs from the old connection are no longer valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgpack

log = logging.getLogger(__name__)

IPC_VERSION = 1
_BODY_COMMANDS = frozenset(
    {"join", "members", "members-filtered", "stats", "get-coordinate"}
    | {"install-key", "use-key", "remove-key", "list-keys"}
)
# Errors Serf answers before the command runs: no body follows, whatever the command.
_NO_BODY_ERRORS = frozenset(
    {"Authentication required", "Handshake required", "Unsupported command"}
)
_AUTH_ERRORS = frozenset({"Authentication required", "Invalid authentication token"})


class SerfError(Exception):
    """Serf answered with an error header; `message` is Serf's own text."""

    def __init__(self, message: str, command: str = "") -> None:
        super().__init__(f"serf {command}: {message}" if command else message)
        self.message = message
        self.command = command


class SerfAuthError(SerfError):
    """The RPC auth key is missing or wrong."""


class SerfConnectionError(SerfError):
    """No connection to the agent (refused, lost, closed, or no reply in time)."""


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: no "never retrieved" noise if nobody awaits it any more


def _reap(task: asyncio.Task[Any]) -> None:
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _error(message: str, command: str) -> SerfError:
    kind = SerfAuthError if message in _AUTH_ERRORS else SerfError
    return kind(message, command)


def _addr(raw: Any) -> str:
    if isinstance(raw, bytes) and len(raw) in (4, 16):
        ip = ipaddress.ip_address(raw)
        mapped = getattr(ip, "ipv4_mapped", None)
        return str(mapped or ip)
    return str(raw or "")


def _versions(raw: Mapping[str, Any], kind: str) -> tuple[int, int, int]:
    return (raw.get(f"{kind}Min", 0), raw.get(f"{kind}Max", 0), raw.get(f"{kind}Cur", 0))


@dataclass(frozen=True)
class Member:
    name: str
    addr: str
    port: int
    tags: dict[str, str]
    status: str  # alive, leaving, left, failed
    protocol: tuple[int, int, int] = (0, 0, 0)  # min, max, current
    delegate: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def from_rpc(cls, raw: Mapping[str, Any]) -> Member:
        return cls(
            name=raw.get("Name", ""),
            addr=_addr(raw.get("Addr")),
            port=int(raw.get("Port", 0)),
            tags=dict(raw.get("Tags") or {}),
            status=raw.get("Status", ""),
            protocol=_versions(raw, "Protocol"),
            delegate=_versions(raw, "Delegate"),
        )


@dataclass(frozen=True)
class Event:
    """A stream record: `member-*` events carry members, `user` and `query` a name and payload;
    a `query` is answered with `EventStream.respond(event.id, payload)`."""

    event: str
    members: tuple[Member, ...] = ()
    name: str = ""
    payload: bytes = b""
    ltime: int = 0
    coalesce: bool = False
    id: int = 0

    @classmethod
    def from_rpc(cls, raw: Mapping[str, Any]) -> Event:
        return cls(
            event=raw.get("Event", ""),
            members=tuple(Member.from_rpc(m) for m in raw.get("Members") or ()),
            name=raw.get("Name", ""),
            payload=raw.get("Payload") or b"",
            ltime=int(raw.get("LTime", 0)),
            coalesce=bool(raw.get("Coalesce", False)),
            id=int(raw.get("ID", 0)),
        )


@dataclass(frozen=True)
class QueryReply:
    type: str  # "ack" or "response"
    node: str
    payload: bytes = b""


@dataclass
class _Call:
    command: str
    future: asyncio.Future[Any]
    has_body: bool

    def finish(self, error: str, body: Any) -> None:
        if error:
            _fail(self.future, _error(error, self.command))
        elif not self.future.done():
            self.future.set_result(body)


_END = object()
_CLOSED = object()  # the subscription is over, but its records still arrive until _END
T = TypeVar("T")


class _Subscription(Generic[T]):
    """A stream or a query: awaitable (starts it), async iterator, async context manager."""

    command = ""

    def __init__(self, client: SerfClient, body: dict[str, Any]) -> None:
        self.client = client
        self.body = body
        self.seq = 0
        self.started: asyncio.Future[None] | None = None
        self.active = False
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def parse(self, raw: Any) -> T | object:
        raise NotImplementedError

    async def start(self) -> Self:
        if self.started is None:
            await self.client._subscribe(self)
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        await self.start()
        item = await self.queue.get()
        if item is _END or isinstance(item, BaseException):
            self.queue.put_nowait(item)  # later calls end (or fail) the same way
            if isinstance(item, BaseException):
                raise item
            raise StopAsyncIteration
        result: T = item
        return result

    def end(self, error: BaseException | None = None) -> None:
        if self.active:
            self.active = False
            self.queue.put_nowait(error or _END)

    async def close(self) -> None:
        """Stop receiving; records still in flight are read and dropped."""
        await self.client._unsubscribe(self)


class EventStream(_Subscription[Event]):
    command = "stream"

    def parse(self, raw: Any) -> Event | object:
        return Event.from_rpc(raw)

    async def respond(self, query_id: int, payload: bytes = b"") -> None:
        await self.client.respond(query_id, payload)


class QueryResults(_Subscription[QueryReply]):
    """A query's acks and responses. Serf closes a query's channels at its deadline, a
    moment before the agent's RPC stream sends `done`; in between, the stream's select
    reads the closed channels' zero values in a busy loop (agent
    ipc_query_response_stream.go), so hundreds to thousands of acks and responses from
    "" with no payload can arrive last. The first of them means the query is over: the
    iteration ends there and the rest are read and dropped until `done`."""

    command = "query"

    def parse(self, raw: Any) -> QueryReply | object:
        kind = raw.get("Type", "")
        if kind == "done":
            return _END
        sender = raw.get("From", "")
        if not sender:
            return _CLOSED
        return QueryReply(kind, sender, raw.get("Payload") or b"")


_Handler = _Call | _Subscription[Any]
_Consumer = Callable[[Any], None]


def _unknown(_body: Any) -> None:  # marker: a body may or may not follow
    return None


class SerfClient:
    """`async with SerfClient("127.0.0.1:7373", auth_key) as serf: await serf.members()`."""

    def __init__(
        self,
        rpc_addr: str = "127.0.0.1:7373",
        auth_key: str = "",
        *,
        timeout: float = 10.0,
        reconnect: bool = True,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        host, _, port = rpc_addr.rpartition(":")
        self.rpc_addr = rpc_addr
        self._host, self._port = host.strip("[]") or "127.0.0.1", int(port)
        self._auth_key = auth_key
        self._timeout = timeout
        self._reconnect = reconnect
        self._backoff = (backoff_initial, backoff_max)
        self._on_reconnect = on_reconnect
        self._seq = 0
        self._handlers: dict[int, _Handler] = {}
        self._discard: set[int] = set()
        self._streams: list[EventStream] = []
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self.reconnects = 0

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, handshake and auth once; raises instead of retrying."""
        if self._supervisor is not None:
            return
        self._closing = False
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        self._closing = True
        self._ready.clear()
        for task in (self._supervisor, self._read_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._supervisor = self._read_task = None
        writer = self._writer
        self._drop_connection(SerfConnectionError("client closed"), keep_streams=False)
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _open(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._timeout
            )
        except (OSError, TimeoutError) as exc:
            raise SerfConnectionError(f"cannot connect to {self.rpc_addr}: {exc}") from exc
        self._writer, self._discard = writer, set()
        self._read_task = asyncio.create_task(self._read_loop(reader))
        try:
            await self._call("handshake", {"Version": IPC_VERSION}, ready=False)
            if self._auth_key:
                await self._call("auth", {"AuthKey": self._auth_key}, ready=False)
            for stream in list(self._streams):
                await self._start(stream)
        except BaseException as exc:
            _reap(self._read_task)
            self._drop_connection(exc, keep_streams=True)
            raise
        self._ready.set()
        log.info("serf.connected", extra={"rpc_addr": self.rpc_addr})

    async def _supervise(self) -> None:
        while True:
            assert self._read_task is not None
            try:
                await self._read_task
                lost: BaseException = SerfConnectionError("connection closed by the agent")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                lost = exc
            self._ready.clear()
            resume = self._reconnect and not self._closing
            self._drop_connection(lost, keep_streams=resume)
            log.warning(
                "serf.connection_lost",
                extra={"rpc_addr": self.rpc_addr, "error": str(lost), "reconnect": resume},
            )
            if not resume:
                return
            await self._reconnect_loop()

    async def _reconnect_loop(self) -> None:
        delay, limit = self._backoff
        attempt = 0
        while not self._closing:
            attempt += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 (jitter)
            try:
                await self._open()
            except (SerfError, OSError) as exc:
                log.warning(
                    "serf.reconnect_failed",
                    extra={"rpc_addr": self.rpc_addr, "attempt": attempt, "error": str(exc)},
                )
                delay = min(delay * 2, limit)
                continue
            self.reconnects += 1
            log.info("serf.reconnected", extra={"rpc_addr": self.rpc_addr, "attempt": attempt})
            if self._on_reconnect is not None:
                try:
                    await self._on_reconnect()
                except Exception:
                    log.exception("serf.on_reconnect_failed", extra={"rpc_addr": self.rpc_addr})
            return

    def _drop_connection(self, error: BaseException, keep_streams: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        failure = error if isinstance(error, SerfError) else SerfConnectionError(str(error))
        handlers, self._handlers = self._handlers, {}
        for handler in handlers.values():
            if isinstance(handler, _Call):
                _fail(handler.future, failure)
                continue
            if handler.started is not None:
                _fail(handler.started, failure)
            if not (keep_streams and isinstance(handler, EventStream)):
                handler.end(failure)
        if not keep_streams:
            for stream in self._streams:
                stream.end(failure if not self._closing else None)
            self._streams.clear()

    # -- wire ------------------------------------------------------------------------------
    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace")
        consume: _Consumer | None = None
        while True:
            data = await reader.read(65536)
            if not data:
                raise SerfConnectionError("connection closed by the agent")
            unpacker.feed(data)
            for obj in unpacker:
                if consume is _unknown and not _is_header(obj):
                    consume = None  # the body of a reply nobody waits for
                elif consume is not None and consume is not _unknown:
                    consume(obj)
                    consume = None
                else:
                    consume = self._on_header(obj)

    def _on_header(self, header: Mapping[str, Any]) -> _Consumer | None:
        seq, error = header.get("Seq", -1), header.get("Error") or ""
        handler = self._handlers.get(seq)
        if isinstance(handler, _Call):
            del self._handlers[seq]
            if handler.has_body and error not in _NO_BODY_ERRORS:
                return lambda body: handler.finish(error, body)
            handler.finish(error, None)
            return None
        if isinstance(handler, _Subscription):
            if handler.started is not None and not handler.started.done():
                if error:
                    del self._handlers[seq]
                    _fail(handler.started, _error(error, handler.command))
                else:
                    handler.started.set_result(None)
                return None
            return lambda body: self._on_record(handler, body)
        if seq in self._discard:
            return lambda body: self._drop_discarded(seq, body)
        log.warning("serf.unexpected_reply", extra={"seq": seq, "error": error})
        return _unknown

    def _drop_discarded(self, seq: int, body: Any) -> None:
        if isinstance(body, dict) and body.get("Type") == "done":
            self._discard.discard(seq)  # a query's last record: nothing more comes for seq

    def _on_record(self, sub: _Subscription[Any], raw: Any) -> None:
        item = sub.parse(raw)
        if item is _END:
            self._handlers.pop(sub.seq, None)
            sub.end()
        elif item is _CLOSED:
            sub.end()
        elif sub.active:
            sub.queue.put_nowait(item)

    async def _send(self, command: str, seq: int, body: Any) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise SerfConnectionError("not connected", command)
        data = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            data += msgpack.packb(body)
        try:
            writer.write(data)
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            raise SerfConnectionError(str(exc), command) from exc

    async def _wait_ready(self, command: str) -> None:
        if self._closing or self._supervisor is None:
            raise SerfConnectionError("client is not connected", command)
        try:
            await asyncio.wait_for(self._ready.wait(), self._timeout)
        except TimeoutError:
            raise SerfConnectionError(f"no connection within {self._timeout}s", command) from None

    async def _call(self, command: str, body: Any = None, *, ready: bool = True) -> Any:
        if ready:
            await self._wait_ready(command)
        self._seq += 1
        seq = self._seq
        call = _Call(command, asyncio.get_running_loop().create_future(), command in _BODY_COMMANDS)
        self._handlers[seq] = call
        try:
            await self._send(command, seq, body)
        except SerfError:
            self._handlers.pop(seq, None)
            raise
        try:
            # On timeout the handler stays registered, so a late reply is still read whole.
            return await asyncio.wait_for(call.future, self._timeout)
        except TimeoutError:
            raise SerfConnectionError(f"no reply within {self._timeout}s", command) from None

    async def _subscribe(self, sub: _Subscription[Any]) -> None:
        await self._wait_ready(sub.command)
        sub.active = True
        if isinstance(sub, EventStream):
            self._streams.append(sub)
        try:
            await self._start(sub)
        except BaseException as exc:
            sub.active = False
            if sub in self._streams:
                self._streams.remove(sub)
            sub.queue.put_nowait(exc)  # iterating a stream that failed to start raises too
            raise

    async def _start(self, sub: _Subscription[Any]) -> None:
        self._seq += 1
        sub.seq = self._seq
        sub.started = asyncio.get_running_loop().create_future()
        self._handlers[sub.seq] = sub
        await self._send(sub.command, sub.seq, sub.body)
        try:
            await asyncio.wait_for(asyncio.shield(sub.started), self._timeout)
        except TimeoutError:
            raise SerfConnectionError(f"no reply within {self._timeout}s", sub.command) from None

    async def _unsubscribe(self, sub: _Subscription[Any]) -> None:
        was_active = sub.active
        sub.end()
        if sub in self._streams:
            self._streams.remove(sub)
        if self._handlers.pop(sub.seq, None) is None:
            return  # its last record came already
        self._discard.add(sub.seq)  # records may still arrive: read and dropped
        if was_active:
            with contextlib.suppress(SerfError):
                await self.stop(sub.seq)

    # -- commands --------------------------------------------------------------------------
    async def members(self) -> list[Member]:
        body = await self._call("members")
        return [Member.from_rpc(m) for m in body.get("Members") or ()]

    async def members_filtered(
        self, tags: Mapping[str, str] | None = None, status: str = "", name: str = ""
    ) -> list[Member]:
        """Filters are regular expressions anchored at both ends (Go syntax)."""
        for pattern in [*(tags or {}).values(), status, name]:
            try:
                re.compile(pattern)
            except re.error as exc:
                # Serf drops the connection on a bad pattern instead of answering.
                raise SerfError(f"invalid filter {pattern!r}: {exc}", "members-filtered") from exc
        body = {"Tags": dict(tags or {}), "Status": status, "Name": name}
        reply = await self._call("members-filtered", body)
        return [Member.from_rpc(m) for m in reply.get("Members") or ()]

    async def join(self, addrs: Sequence[str], replay: bool = False) -> int:
        reply = await self._call("join", {"Existing": list(addrs), "Replay": replay})
        return int(reply.get("Num", 0))

    async def leave(self) -> None:
        """Leave the cluster gracefully; the agent then shuts down, so no reconnect follows."""
        self._reconnect = False
        await self._call("leave")

    async def force_leave(self, node: str) -> None:
        await self._call("force-leave", {"Node": node})

    async def event(self, name: str, payload: bytes = b"", coalesce: bool = True) -> None:
        await self._call("event", {"Name": name, "Payload": payload, "Coalesce": coalesce})

    async def tags(self, set: Mapping[str, str] | None = None, delete: Sequence[str] = ()) -> None:
        await self._call("tags", {"Tags": dict(set or {}), "DeleteTags": list(delete)})

    async def get_coordinate(self, node: str) -> dict[str, Any] | None:
        """`{Vec, Error, Adjustment, Height}` (seconds) or None when the node has none."""
        reply = await self._call("get-coordinate", {"Node": node})
        coord: dict[str, Any] | None = reply.get("Coord") if reply.get("Ok") else None
        return coord

    async def stats(self) -> dict[str, dict[str, str]]:
        reply: dict[str, dict[str, str]] = await self._call("stats")
        return reply

    async def respond(self, query_id: int, payload: bytes = b"") -> None:
        await self._call("respond", {"ID": query_id, "Payload": payload})

    async def stop(self, seq: int) -> None:
        await self._call("stop", {"Stop": seq})

    def stream(self, event_types: str | Sequence[str] = "*") -> EventStream:
        """`async with serf.stream("user,query") as events: async for event in events: ...`"""
        kinds = event_types if isinstance(event_types, str) else ",".join(event_types)
        return EventStream(self, {"Type": kinds})

    def query(
        self,
        name: str,
        payload: bytes = b"",
        *,
        filter_nodes: Sequence[str] = (),
        filter_tags: Mapping[str, str] | None = None,
        request_ack: bool = False,
        timeout: float | None = None,
    ) -> QueryResults:
        """Acks and responses until Serf's `done` (at the timeout); leave the loop (or close
        the results) as soon as you have what you need."""
        body = {
            "FilterNodes": list(filter_nodes),
            "FilterTags": dict(filter_tags or {}),
            "RequestAck": request_ack,
            "Timeout": int((timeout or 0) * 1e9),  # a Go time.Duration; 0 = Serf's default
            "Name": name,
            "Payload": payload,
        }
        return QueryResults(self, body)


def _is_header(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"Seq", "Error"}


__all__ = [
    "Event",
    "EventStream",
    "Member",
    "QueryReply",
    "QueryResults",
    "SerfAuthError",
    "SerfClient",
    "SerfConnectionError",
    "SerfError",
]
