"""What the forward bench needs from each system under test, and from its signalling.

A `System` runs in the bench driver: it starts the SFU (its CPU is what is measured, by
`pid`), and describes how clients reach it with a JSON-able `spec`. Client processes (one
publisher, subscribers spread over a few processes) build a `Signalling` from that spec with
`signalling_from_spec`, so every system is driven by identical clients; only the signalling
differs.

Ingest runs (`sfumesh bench forward --publishers`) need P independent publisher/subscriber
pairs on one SFU: a system started with `channels=P` lists in its spec's `"channels"` what
differs per pair (sfumesh: a room each; Janus: a feed each in its room), and a client turns
the spec into its pair's with `channel_spec`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiortc import RTCPeerConnection


class Signalling(Protocol):
    """How one client talks to one system. Lives in a client process."""

    async def publish(self, pc: RTCPeerConnection) -> None:
        """`pc` has its sendonly audio and video transceivers: offer, apply the system's
        answer, return once it is applied."""

    async def subscribe(self, pc: RTCPeerConnection) -> None:
        """Subscribe to the publisher's audio and video on `pc`: apply the system's offer,
        answer it, return once the answer is sent. Later offers (renegotiation) are
        answered in the background until `close`."""

    async def close(self) -> None:
        """Leave (hang up), close the signalling channel."""


class System(Protocol):
    """One SFU under test, run by the driver."""

    #: the name used in the table and the JSON results
    name: str

    @property
    def pid(self) -> int:
        """The process whose CPU (user + sys, all threads) is measured."""

    async def start(self) -> None:
        """Start the SFU (and prepare a room for one publisher); return once it serves."""

    def spec(self) -> dict[str, Any]:
        """JSON-able description clients turn into a `Signalling` (`"system"` names the
        factory in `SIGNALLING`)."""

    async def stop(self) -> None:
        """Stop the SFU and everything it started, by PID."""


SignallingFactory = Callable[[dict[str, Any], str], Signalling]

#: spec["system"] -> factory(spec, role) where role is "publisher" or "subscriber";
#: each system module registers its own.
SIGNALLING: dict[str, SignallingFactory] = {}


def channel_spec(spec: dict[str, Any], channel: int) -> dict[str, Any]:
    """The spec of publisher/subscriber pair `channel`: the system's spec with that pair's
    fields (`spec["channels"][channel]`) put over it. Channel 0 of a spec without channels is
    the spec itself."""
    channels = spec.get("channels") or []
    if not channels and channel == 0:
        return spec
    if not 0 <= channel < len(channels):
        raise ValueError(f"channel {channel} out of the spec's {len(channels)}")
    return {**spec, **channels[channel]}


def signalling_from_spec(spec: dict[str, Any], role: str) -> Signalling:
    factory = SIGNALLING.get(str(spec.get("system")))
    if factory is None:
        raise ValueError(f"no signalling for system {spec.get('system')!r}")
    return factory(spec, role)
