"""mesh/relay_link.py: an SDP-free node-to-node media link from aiortc's ORTC objects.

Two links in one process on 127.0.0.1 connect using only the compact descriptions they
exchange (JSON, each under 1000 bytes with 8 tracks declared) and carry raw RTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiortc.rtp import RtpPacket

from mesh import relay_signal as signal
from mesh.relay_description import (
    MAX_DESCRIPTION_BYTES,
    decode_description,
    encode_description,
    is_controlling,
    parse_track,
)
from mesh.relay_signal import Message
from node.media import adapter
from node.relay.link import RelayLink, RemoteTrack

VP8_PT = 97
OPUS_PT = 111


@pytest.fixture(autouse=True)
def loopback() -> Iterator[None]:
    adapter.set_host_addresses(["127.0.0.1"])
    yield
    adapter.set_host_addresses(None)


class Received:
    def __init__(self) -> None:
        self.packets: list[tuple[int, str, RtpPacket]] = []
        self.changed = asyncio.Event()

    def __call__(self, track: RemoteTrack, packet: RtpPacket) -> None:
        self.packets.append((track.ssrc, track.track_id, packet))
        self.changed.set()

    async def wait_for(self, count: int, within_s: float = 5.0) -> None:
        async def wait() -> None:
            while len(self.packets) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), within_s)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RelayLink, RelayLink, Received, Received]]:
    got_a, got_b = Received(), Received()
    # node names decide the roles: "node-a" < "node-b"
    a = RelayLink(is_controlling("node-a", "node-b"), got_a)
    b = RelayLink(is_controlling("node-b", "node-a"), got_b)
    yield a, b, got_a, got_b
    await a.close()
    await b.close()


async def exchange(a: RelayLink, b: RelayLink) -> tuple[bytes, bytes]:
    """Connect the two links the way the mesh will: bytes out, bytes in."""
    wire_a = encode_description(await a.local_description())
    wire_b = encode_description(await b.local_description())
    await asyncio.gather(
        a.connect(decode_description(wire_b)), b.connect(decode_description(wire_a))
    )
    return wire_a, wire_b


def vp8_payload(n: int) -> bytes:
    # VP8 payload descriptor (S=1, PID 0) + made-up frame bytes
    return bytes([0x10]) + bytes([n & 0xFF]) * (200 + n)


async def test_two_links_carry_raw_rtp_with_compact_descriptions(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    a, b, _, got_b = pair
    video = await a.add_track("room1/alice:v0", "video", "VP8", VP8_PT)
    audio = await a.add_track("room1/alice:a0", "audio", "opus", OPUS_PT)
    for n in range(6):  # 8 tracks declared in all (on a's side)
        await a.add_track(f"room{n}/participant-{n}:v0", "video", "VP8", VP8_PT)
    for n in range(4):
        await b.add_track(f"room{n}/bob-{n}:a0", "audio", "opus", OPUS_PT)

    wire_a, wire_b = await exchange(a, b)
    assert len(wire_a) < MAX_DESCRIPTION_BYTES, wire_a
    assert len(wire_b) < MAX_DESCRIPTION_BYTES, wire_b
    logging.getLogger(__name__).info(
        "relay description sizes", extra={"bytes_8_tracks": len(wire_a), "bytes_4": len(wire_b)}
    )
    assert len(json.loads(wire_a)["t"]) == 8
    assert a.ice_state == b.ice_state == "completed"
    assert a.dtls_state == b.dtls_state == "connected"
    assert len(b.remote_tracks) == 8 and len(a.remote_tracks) == 4

    await video.wait_ready()
    await audio.wait_ready()
    stamp = adapter.send_stamp()
    sent: dict[int, list[tuple[int, int, bytes]]] = {video.ssrc: [], audio.ssrc: []}
    for n in range(20):
        seq_v, ts_v, payload_v = (65525 + n) & 0xFFFF, 1000 + n * 3000, vp8_payload(n)
        assert video.write(VP8_PT, n % 5 == 4, seq_v, ts_v, payload_v, None, stamp)
        sent[video.ssrc].append((seq_v, ts_v, payload_v))
        seq_a, ts_a, payload_a = 65530 + n, 500 + n * 960, bytes([0xF8, n]) + b"opus" * 10
        assert audio.write(OPUS_PT, 0, seq_a & 0xFFFF, ts_a, payload_a, (True, 30), stamp)
        sent[audio.ssrc].append((seq_a & 0xFFFF, ts_a, payload_a))
        await asyncio.sleep(0.002)

    await got_b.wait_for(40)
    by_ssrc: dict[int, list[tuple[int, int, bytes]]] = {video.ssrc: [], audio.ssrc: []}
    for ssrc, track_id, packet in got_b.packets:
        assert packet.ssrc == ssrc
        expected_id = "room1/alice:v0" if ssrc == video.ssrc else "room1/alice:a0"
        assert track_id == expected_id
        expected_pt = VP8_PT if ssrc == video.ssrc else OPUS_PT
        assert packet.payload_type == expected_pt
        by_ssrc[ssrc].append((packet.sequence_number, packet.timestamp, packet.payload))
    assert by_ssrc == sent
    audio_levels = {p.extensions.audio_level for s, _, p in got_b.packets if s == audio.ssrc}
    assert audio_levels == {(True, 30)}
    assert adapter.CODEC_WORK.total == 0
    assert video.nacked == 0  # nothing was lost on loopback

    await a.close()
    await b.close()
    assert a.ended_reason is not None and b.ended_reason is not None
    assert a.closed and b.closed
    assert not a.remote_tracks and not b.remote_tracks


async def test_keyframe_requests_and_nacks_cross_the_link(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    a, b, _, got_b = pair
    video = await a.add_track("r/alice:v0", "video", "VP8", VP8_PT)
    await exchange(a, b)
    await video.wait_ready()

    requests = asyncio.Event()
    video.on_keyframe_request = requests.set
    assert await b.request_keyframe("r/alice:v0")
    await asyncio.wait_for(requests.wait(), 5)
    assert not await b.request_keyframe("no/such:track")

    # packet 3 is "lost" on the way; b NACKs it and a answers from its RTP history
    video.drop = lambda packet: packet.sequence_number == 3 and video.retransmitted == 0
    stamp = adapter.send_stamp()
    for seq in range(1, 8):
        video.write(VP8_PT, 0, seq, seq * 3000, vp8_payload(seq), None, stamp)
        await asyncio.sleep(0.005)
    await got_b.wait_for(7)
    assert sorted(p.sequence_number for _, _, p in got_b.packets) == list(range(1, 8))
    assert video.nacked >= 1 and video.retransmitted >= 1


async def test_tracks_added_after_connect_need_no_renegotiation(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    a, b, _, got_b = pair
    await exchange(a, b)  # no tracks yet
    late = await a.add_track("r/carol:v0", "video", "VP8", VP8_PT)
    await late.wait_ready()
    # only the track map changes: a fresh description, applied without touching ICE/DTLS
    update = decode_description(encode_description(await a.local_description()))
    await b.apply_remote_tracks(update)
    assert late.write(VP8_PT, 1, 10, 90000, vp8_payload(1), None, adapter.send_stamp())
    await got_b.wait_for(1)
    assert got_b.packets[0][1] == "r/carol:v0"

    await a.remove_track("r/carol:v0")
    await b.apply_remote_tracks(await a.local_description())
    assert not b.remote_tracks


def test_roles_are_deterministic() -> None:
    assert is_controlling("hcm-1", "sg-1") and not is_controlling("sg-1", "hcm-1")
    with pytest.raises(ValueError):
        is_controlling("n1", "n1")


async def test_same_role_on_both_sides_is_refused() -> None:
    def ignore(track: RemoteTrack, packet: RtpPacket) -> None:
        return None

    a, b = RelayLink(True, ignore), RelayLink(True, ignore)
    try:
        with pytest.raises(ValueError, match="DTLS server"):
            await a.connect(await b.local_description())
    finally:
        await a.close()
        await b.close()


GOOD: dict[str, Any] = {
    "v": 1,
    "u": "Ab3d",
    "p": "abcdefghijklmnopqrstuv",
    "f": "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k=",
    "d": "s",
    "c": ["6815297761 1 udp 2130706431 127.0.0.1 40123 typ host"],
    "t": [[1234, "room/alice:v0", "v", 97, "VP8"], [99, "room/alice:a0", "a", 111, "opus"]],
}


def with_(**changes: Any) -> dict[str, Any]:
    value = dict(GOOD)
    value.update(changes)
    return value


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


def test_good_description_round_trips() -> None:
    data = encode_description(GOOD)
    assert decode_description(data) == GOOD
    assert decode_description(data.decode()) == GOOD


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (without("u"), "missing field"),
        (without("t"), "missing field"),
        (without("f"), "missing field"),
        (with_(x=1), "unknown field"),
        (with_(v=2), "version"),
        (with_(u=5), "must be a string"),
        (with_(u="a b!"), "characters"),
        (with_(p="short"), "22-256"),
        (with_(f="not base64!"), "base64"),
        (with_(f="AAAA"), "SHA-256"),
        (with_(f=["x"]), "base64 string"),
        (with_(d="x"), "DTLS role"),
        (with_(c="127.0.0.1"), "must be a list"),
        (with_(c=[]), "candidates"),
        (with_(c=["hello"]), "not an ICE candidate"),
        (with_(c=["1 1 udp 1 127.0.0.1 99999 typ host"]), "port"),
        (with_(c=["1 1 udp x 127.0.0.1 9 typ host"]), "not an ICE candidate"),
        (with_(t={"a": 1}), "must be a list"),
        (with_(t=[[1, "x", "v", 97]]), "ssrc, track id"),
        (with_(t=[["1", "x", "v", 97, "VP8"]]), "ssrc must be an integer"),
        (with_(t=[[0, "x", "v", 97, "VP8"]]), "ssrc must be in"),
        (with_(t=[[True, "x", "v", 97, "VP8"]]), "must be an integer"),
        (with_(t=[[1, "has space", "v", 97, "VP8"]]), "characters"),
        (with_(t=[[1, "x", "video", 97, "VP8"]]), "kind"),
        (with_(t=[[1, "x", "v", 200, "VP8"]]), "payload type must be in"),
        (with_(t=[[1, "x", "v", 72, "VP8"]]), "RTCP"),
        (with_(t=[[1, "x", "v", 97, "AV1"]]), "codec must be one of"),
        (with_(t=[[1, "x", "a", 97, "VP8"]]), "is not audio"),
        (with_(t=[[1, "x", "v", 97, "VP8"], [1, "y", "v", 97, "VP8"]]), "share an SSRC"),
        (with_(t=[[1, "x", "v", 97, "VP8"], [2, "x", "v", 97, "VP8"]]), "share a track id"),
    ],
)
def test_bad_descriptions_raise_value_error(value: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_description(value)
    with pytest.raises(ValueError, match=message):
        decode_description(json.dumps(value))


def test_bad_encodings_raise_value_error() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        decode_description(b"{nope")
    with pytest.raises(ValueError, match="not JSON"):
        decode_description(b"\xff\xfe")
    with pytest.raises(ValueError, match="JSON object"):
        decode_description(b"[1, 2]")


def test_oversize_descriptions_raise_value_error() -> None:
    tracks = [
        [n + 1, f"room-{n:04d}/a-rather-long-participant-name:v0", "v", 97, "VP8"]
        for n in range(20)
    ]
    big = with_(t=tracks)
    with pytest.raises(ValueError, match="more than 1000"):
        encode_description(big)
    with pytest.raises(ValueError, match="more than 1000"):
        decode_description(json.dumps(big))
    with pytest.raises(ValueError, match="more than 1000"):
        decode_description(b" " * 2000)


async def test_peer_closing_ends_the_link_on_the_surviving_side() -> None:
    reasons: list[str] = []
    ended = asyncio.Event()

    def on_ended(reason: str) -> None:
        reasons.append(reason)
        ended.set()

    a = RelayLink(True, Received())
    b = RelayLink(False, Received(), on_ended=on_ended)
    try:
        await a.add_track("r/alice:v0", "video", "VP8", VP8_PT)
        await exchange(a, b)
        await a.close()
        await asyncio.wait_for(ended.wait(), 5)
        assert reasons == ["dtls-closed"]
    finally:
        await a.close()
        await b.close()
    assert reasons == ["dtls-closed"]  # reported once


async def test_layer_streams_sharing_an_estimator_hear_one_estimate(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    """The layer streams of a relayed simulcast track are estimated together on the
    receiving side (`RtpTap.share_estimator`): one REMB names both SSRCs, so both senders
    hear the same estimate of the two streams' bandwidth (alone, the small stream's sender
    heard an estimate of its own small stream only)."""
    a, b, _, got_b = pair
    small = await a.add_track("r/alice:0~0", "video", "VP8", VP8_PT)
    large = await a.add_track("r/alice:0~2", "video", "VP8", VP8_PT)
    await exchange(a, b)
    await small.wait_ready()
    await large.wait_ready()
    remotes = {remote.ssrc: remote for remote in b.remote_tracks.values()}
    remotes[large.ssrc].tap.share_estimator(remotes[small.ssrc].tap)
    sent = 0
    deadline = asyncio.get_running_loop().time() + 10.0
    seq = 1
    while small.remb_bitrate is None or large.remb_bitrate is None or seq < 60:
        assert asyncio.get_running_loop().time() < deadline, (
            small.remb_bitrate,
            large.remb_bitrate,
        )
        stamp = adapter.send_stamp()
        small.write(VP8_PT, 1, seq, seq * 3000, bytes([0x10]) + b"s" * 100, None, stamp)
        for part in range(4):
            large.write(
                VP8_PT, part == 3, seq * 4 + part, seq * 3000, vp8_payload(900), None, stamp
            )
        sent += 5
        seq += 1
        await asyncio.sleep(0.02)
    await got_b.wait_for(sent // 2)
    assert small.remb_bitrate == large.remb_bitrate, (small.remb_bitrate, large.remb_bitrate)


async def test_a_link_with_more_tracks_than_one_message_holds_still_describes_itself(
    pair: tuple[RelayLink, RelayLink, Received, Received],
) -> None:
    """A relay opened for 16 tracks at once (a room whose publishers were all there before
    the first remote subscriber: `sfumesh bench relay --relay-tracks 16`) must still offer:
    the description lists every track, the offer carries what fits in one Serf message and
    the rest follow as `tracks` updates. It used to raise (the description was held to the
    message size before the tracks were trimmed), so the relay never opened."""
    a, _, _, _ = pair
    for n in range(16):
        await a.add_track(f"room/p{n}-a-long-session-id:0", "video", "VP8", VP8_PT)
    description = await a.local_description()
    assert len(description["t"]) == 16
    assert len(json.dumps(description, separators=(",", ":"))) > MAX_DESCRIPTION_BYTES
    offer, left = signal.fit_description(
        Message("offer", signal.new_id(), "node-a", "boot", "link", description)
    )
    assert len(signal.encode(offer)) <= signal.MAX_MESSAGE_BYTES
    assert offer.description is not None and left
    assert len(offer.description["t"]) + len(left) == 16
    updates = signal.track_updates(offer, 1, [parse_track(track, 0) for track in left], removed=())
    assert all(len(signal.encode(update)) <= signal.MAX_MESSAGE_BYTES for update in updates)
