"""mesh/relay_signal.py: the relay's Serf messages, their validation and their size bound."""

from __future__ import annotations

import base64
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import relay_signal as signal
from mesh.relay_description import TrackInfo
from mesh.relay_signal import MAX_MESSAGE_BYTES, Message, Unauthentic

CANDIDATE = "3151584716 1 udp 2130706431 127.0.0.1 40123 typ host"


def description(tracks: int = 0) -> dict[str, object]:
    return {
        "v": 1,
        "u": "Ab3d",
        "p": "p" * 22,
        "f": base64.b64encode(bytes(range(32))).decode(),
        "d": "s",
        "c": [CANDIDATE],
        "t": [[1000 + i, f"{'a' * 32}:{i}", "v", 96, "VP8"] for i in range(tracks)],
    }


KEY = b"k" * 32
NOW = 1_780_000_000.0


def track(i: int) -> TrackInfo:
    if i % 2:
        return TrackInfo(2000 + i, f"{'b' * 32}:{i}", "audio", 111, "opus")
    return TrackInfo(2000 + i, f"{'b' * 32}:{i}", "video", 96, "VP8")


def offer(tracks: int = 0) -> Message:
    return Message(
        "offer", "req1", "node-1", "boot1", "link1", description(tracks), known_link="old1"
    )


def test_offer_round_trip() -> None:
    message = offer(2)
    decoded = signal.decode(signal.encode(message))
    assert decoded.kind == "offer" and decoded.node == "node-1" and decoded.boot == "boot1"
    assert decoded.link == "link1" and decoded.known_link == "old1"
    assert decoded.description == message.description


def test_an_offer_too_big_is_refused_and_fit_moves_tracks_out() -> None:
    big = offer(20)
    with pytest.raises(ValueError, match=f"more than {MAX_MESSAGE_BYTES}"):
        signal.encode(big)
    fitted, left = signal.fit_description(big)
    data = signal.encode(fitted)
    assert len(data) <= MAX_MESSAGE_BYTES
    # the seal (time and MAC) fits too
    assert len(signal.seal(fitted, KEY, to="node-2", now=time.time())) <= MAX_MESSAGE_BYTES
    kept = fitted.description["t"] if fitted.description else []
    assert len(kept) + len(left) == 20 and len(kept) >= 5
    assert big.description is not None
    assert [t[1] for t in kept + left] == [t[1] for t in big.description["t"]]


@settings(max_examples=60, deadline=None)
@given(added=st.integers(0, 60), removed=st.integers(0, 60))
def test_track_updates_fit_and_carry_every_change_in_order(added: int, removed: int) -> None:
    header = Message("tracks", "", "node-1", "boot1", "link1")
    adds = [track(i) for i in range(added)]
    removes = [f"{'c' * 32}:{i}" for i in range(removed)]
    updates = signal.track_updates(header, 7, adds, removes)
    assert [u.seq for u in updates] == list(range(7, 7 + len(updates)))
    carried_adds: list[TrackInfo] = []
    carried_removes: list[str] = []
    for update in updates:
        data = signal.seal(update, KEY, to="node-2", now=NOW)
        assert len(data) <= MAX_MESSAGE_BYTES
        back = signal.unseal(data, KEY, me="node-2", now=NOW, window_s=30)
        assert back.seq == update.seq and back.link == "link1"
        carried_adds += back.added
        carried_removes += back.removed
    assert carried_adds == adds and carried_removes == removes
    if added + removed == 0:
        assert updates == []


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"m": "hello"}, "unknown kind"),
        ({"r": ""}, "field 'r'"),
        ({"n": "bad node!"}, "field 'n'"),
        ({"l": "x" * 40}, "field 'l'"),
        ({"d": {"v": 2}}, "missing field"),
        ({"k": 5}, "field 'k'"),
    ],
)
def test_bad_offers_are_refused(change: dict[str, object], complaint: str) -> None:
    wire = {**offer().wire(), **change}
    with pytest.raises(ValueError, match=complaint):
        signal.decode(json.dumps(wire).encode())


@pytest.mark.parametrize(
    "wire",
    [
        {"m": "tracks", "r": "a", "n": "n1", "b": "b", "l": "l", "s": 0, "a": [], "x": []},
        {"m": "tracks", "r": "a", "n": "n1", "b": "b", "l": "l", "s": True, "a": [], "x": []},
        {"m": "tracks", "r": "a", "n": "n1", "b": "b", "l": "l", "s": 1, "a": {}, "x": []},
        {"m": "tracks", "r": "a", "n": "n1", "b": "b", "l": "l", "s": 1, "a": [[1]], "x": []},
        {"m": "tracks", "r": "a", "n": "n1", "b": "b", "l": "l", "s": 1, "a": [], "x": [""]},
        {"m": "refuse", "r": "a"},
        {"m": "close", "r": "a", "n": "n1", "b": "b"},
        ["not", "an", "object"],
    ],
)
def test_bad_messages_are_refused(wire: object) -> None:
    with pytest.raises(ValueError):
        signal.decode(json.dumps(wire).encode())


def test_oversized_and_non_json_input_is_refused_before_parsing() -> None:
    with pytest.raises(ValueError, match=f"more than {MAX_MESSAGE_BYTES}"):
        signal.decode(b"{" + b" " * 2000 + b"}")
    with pytest.raises(ValueError, match="not JSON"):
        signal.decode(b"\xff\xfe")


def test_replies_need_no_sender_and_pointers_are_recognised() -> None:
    assert signal.decode(b'{"m":"ok","r":"abc"}').kind == "ok"
    refused = signal.decode(b'{"m":"refuse","r":"abc","e":"glare"}')
    assert refused.reason == "glare"
    assert signal.is_pointer("sfumesh:relay-msg:" + "a" * 24)
    assert not signal.is_pointer("sfumesh:session:{x}")


def test_a_sealed_message_opens_with_the_key_for_its_recipient_within_the_window() -> None:
    message = offer(2)
    data = signal.seal(message, KEY, to="node-2", now=NOW)
    opened = signal.unseal(data, KEY, me="node-2", now=NOW + 29, window_s=30)
    assert opened.stamp == int(NOW * 1000)
    assert opened.description == message.description and opened.request == "req1"
    # a clock a little behind the sender's is fine too
    assert signal.unseal(data, KEY, me="node-2", now=NOW - 29, window_s=30).node == "node-1"


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda m: signal.seal(m, b"o" * 32, to="node-2", now=NOW), "bad-mac"),  # another key
        (lambda m: signal.seal(m, KEY, to="node-3", now=NOW), "bad-mac"),  # for another node
        (lambda m: signal.seal(m, KEY, to="node-2", now=NOW - 31), "stale"),
        (lambda m: signal.seal(m, KEY, to="node-2", now=NOW + 31), "stale"),  # from the future
        (lambda m: signal.encode(m), "unsealed"),
        # one bit changed anywhere before the MAC: the node name, the time
        (
            lambda m: signal.seal(m, KEY, to="node-2", now=NOW).replace(b"node-1", b"node-9"),
            "bad-mac",
        ),
        (lambda m: _flip(signal.seal(m, KEY, to="node-2", now=NOW), -60), "bad-mac"),
        # a MAC moved off the end, or a second one
        (lambda m: signal.seal(m, KEY, to="node-2", now=NOW) + b" ", "unsealed"),
    ],
)
def test_forged_messages_do_not_unseal(forge: object, reason: str) -> None:
    assert callable(forge)
    with pytest.raises(Unauthentic) as raised:
        signal.unseal(forge(offer()), KEY, me="node-2", now=NOW, window_s=30)
    assert raised.value.reason == reason


def test_short_keys_are_refused_for_sealing_and_unsealing() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        signal.seal(offer(), b"short", to="node-2", now=NOW)
    data = signal.seal(offer(), KEY, to="node-2", now=NOW)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        signal.unseal(data, b"", me="node-2", now=NOW, window_s=30)


@settings(max_examples=50, deadline=None)
@given(needs=st.lists(st.integers(signal.NEED_MIN, signal.NEED_MAX), min_size=1, max_size=60))
def test_needs_fit_and_carry_every_value(needs: list[int]) -> None:
    header = Message("needs", "", "node-1", "boot1", "link1")
    pairs = [(f"{'c' * 32}:{i}", need) for i, need in enumerate(needs)]
    messages = signal.needs_updates(header, pairs)
    carried: list[tuple[str, int]] = []
    for message in messages:
        data = signal.encode(message)
        assert len(data) + signal.SEAL_BYTES <= MAX_MESSAGE_BYTES
        decoded = signal.decode(data)
        assert decoded.kind == "needs" and decoded.link == "link1" and decoded.node == "node-1"
        carried.extend(decoded.needs)
    assert carried == pairs
    assert len({m.request for m in messages}) == len(messages)


@settings(max_examples=50, deadline=None)
@given(
    sets=st.lists(
        st.lists(st.integers(signal.NEED_MIN, signal.NEED_MAX), min_size=1, max_size=4),
        min_size=1,
        max_size=40,
    )
)
def test_needs_keep_each_tracks_set_in_one_message(sets: list[list[int]]) -> None:
    """Several needs of one track (its subscribers' different tiles: the layers the link
    carries) travel in one message: the receiver takes a message's set of a track as whole,
    so a split between two of them would drop the other tiles' layers for a moment."""
    header = Message("needs", "", "node-1", "boot1", "link1")
    pairs = [(f"{'c' * 32}:{i}", need) for i, needs in enumerate(sets) for need in needs]
    messages = signal.needs_updates(header, pairs)
    carried: list[tuple[str, int]] = []
    for message in messages:
        data = signal.encode(message)
        assert len(data) + signal.SEAL_BYTES <= MAX_MESSAGE_BYTES
        decoded = signal.decode(data)
        carried.extend(decoded.needs)
        for track_id in {t for t, _ in decoded.needs}:
            whole = [need for t, need in pairs if t == track_id]
            assert [need for t, need in decoded.needs if t == track_id] == whole
    assert carried == pairs


@pytest.mark.parametrize(
    "needs",
    [
        [],
        [["a:1"]],
        [["a:1", signal.NEED_MAX + 1]],
        [["a:1", -2]],
        [["a:1", True]],
        [["a:1", "7"]],
        [["bad id with spaces", 7]],
        "a:1",
    ],
)
def test_bad_needs_are_refused(needs: object) -> None:
    wire = {"m": "needs", "r": "req1", "n": "node-1", "b": "boot1", "l": "link1", "w": needs}
    with pytest.raises(ValueError):
        signal.decode(json.dumps(wire).encode())
