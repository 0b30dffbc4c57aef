"""The relay link's description: what one node tells another to open a media link, < 1 KB.

A compact JSON object, for example

    {"v":1,"u":"Ab3d","p":"<22 chars>","f":"<base64 sha-256>","d":"s",
     "c":["<foundation> 1 udp <priority> 10.0.0.5 40123 typ host"],
     "t":[[2868917342,"room/alice:0","v",97,"VP8"],[1170334582,"room/alice:1","a",96,"opus"]]}

* `u`/`p`: ICE usernameFragment and password; `c`: the host candidates.
* `f`: the DTLS certificate's SHA-256 fingerprint (base64, 44 characters instead of 95).
* `d`: the sender's DTLS role, "s" (server) or "c" (client).
* `t`: what the sender sends: [SSRC, track id, kind "a"/"v", payload type, codec name].

Pure message codec (validation included), so it lives in mesh/ with the signalling codec
(`mesh.relay_signal`); the link that acts on a description is the node's
(`node.relay.link`). Candidates are parsed with aiortc's public SDP candidate parser.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiortc.sdp import candidate_from_sdp

DESCRIPTION_VERSION: Final = 1
#: an encoded description must not be longer than this (Serf messages stay under ~1 KB)
MAX_DESCRIPTION_BYTES: Final = 1000
MAX_CANDIDATES: Final = 8
MAX_CANDIDATE_CHARS: Final = 160
MAX_TRACK_ID_CHARS: Final = 64
MAX_TRACKS: Final = 64

_ICE_CHARS: Final = re.compile(r"[A-Za-z0-9+/]+")
_TRACK_ID: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_KINDS: Final = {"a": "audio", "v": "video"}
KIND_CODES: Final = {kind: code for code, kind in _KINDS.items()}
_FIELDS: Final = ("v", "u", "p", "f", "d", "c", "t")


#: codec names a description may carry, with their kind (what aiortc can packetise / forward)
CODEC_KINDS: Final[Mapping[str, str]] = {
    "VP8": "video",
    "H264": "video",
    "opus": "audio",
    "PCMU": "audio",
    "PCMA": "audio",
    "G722": "audio",
}


def is_controlling(local_node: str, remote_node: str) -> bool:
    """The deterministic role rule: the node whose name sorts first controls ICE (and is
    therefore the DTLS server)."""
    if local_node == remote_node:
        raise ValueError(f"a relay link needs two different nodes, got {local_node!r} twice")
    return local_node < remote_node


@dataclass(frozen=True)
class TrackInfo:
    """One track a side of the link sends: its SSRC, the mesh-wide track id and codec."""

    ssrc: int
    track_id: str
    kind: str
    payload_type: int
    codec: str

    def wire(self) -> list[int | str]:
        return [self.ssrc, self.track_id, KIND_CODES[self.kind], self.payload_type, self.codec]


@dataclass(frozen=True)
class RelayDescription:
    """What one side of a link tells the other (validated)."""

    ice_ufrag: str
    ice_password: str
    fingerprint_sha256: bytes
    dtls_role: str  # "server" | "client"
    candidates: tuple[str, ...]
    tracks: tuple[TrackInfo, ...]

    def wire(self) -> dict[str, Any]:
        return {
            "v": DESCRIPTION_VERSION,
            "u": self.ice_ufrag,
            "p": self.ice_password,
            "f": base64.b64encode(self.fingerprint_sha256).decode("ascii"),
            "d": "s" if self.dtls_role == "server" else "c",
            "c": list(self.candidates),
            "t": [track.wire() for track in self.tracks],
        }

    @property
    def fingerprint_hex(self) -> str:
        """The fingerprint as DTLS compares it (upper-case hex pairs joined by colons)."""
        return ":".join(f"{b:02X}" for b in self.fingerprint_sha256)


def _string(value: object, name: str, pattern: re.Pattern[str], low: int, high: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"relay description: {name} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise ValueError(f"relay description: {name} must be {low}-{high} characters long")
    if not pattern.fullmatch(value):
        raise ValueError(f"relay description: {name} has characters that are not allowed")
    return value


def _integer(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"relay description: {name} must be an integer")
    if not low <= value <= high:
        raise ValueError(f"relay description: {name} must be in {low}..{high}, got {value}")
    return value


def _candidate(value: object, index: int) -> str:
    name = f"candidate {index}"
    if not isinstance(value, str):
        raise ValueError(f"relay description: {name} must be a string")
    if len(value) > MAX_CANDIDATE_CHARS:
        raise ValueError(f"relay description: {name} is longer than {MAX_CANDIDATE_CHARS}")
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise ValueError(f"relay description: {name} is not an ICE candidate: {value!r}")
    try:
        candidate = candidate_from_sdp(value)
    except (AssertionError, ValueError, IndexError) as exc:
        raise ValueError(f"relay description: {name} is not an ICE candidate: {value!r}") from exc
    if candidate.component != 1 or candidate.protocol.lower() not in ("udp", "tcp"):
        raise ValueError(f"relay description: {name} must be RTP component 1 over udp/tcp")
    if not 0 < candidate.port < 65536:
        raise ValueError(f"relay description: {name} has a bad port")
    return value


def parse_track(value: object, index: int) -> TrackInfo:
    """One validated track entry ([ssrc, id, kind, payload type, codec])."""
    name = f"track {index}"
    if not isinstance(value, list) or len(value) != 5:
        raise ValueError(
            f"relay description: {name} must be [ssrc, track id, kind, payload type, codec]"
        )
    ssrc = _integer(value[0], f"{name} ssrc", 1, 0xFFFFFFFF)
    track_id = _string(value[1], f"{name} id", _TRACK_ID, 1, MAX_TRACK_ID_CHARS)
    kind_code = value[2]
    if not isinstance(kind_code, str) or kind_code not in _KINDS:
        raise ValueError(f'relay description: {name} kind must be "a" or "v"')
    payload_type = _integer(value[3], f"{name} payload type", 0, 127)
    if 72 <= payload_type <= 76:
        raise ValueError(f"relay description: {name} payload type {payload_type} clashes with RTCP")
    codec = value[4]
    if not isinstance(codec, str) or codec not in CODEC_KINDS:
        raise ValueError(
            f"relay description: {name} codec must be one of {', '.join(CODEC_KINDS)}, "
            f"got {codec!r}"
        )
    kind = _KINDS[kind_code]
    if CODEC_KINDS[codec] != kind:
        raise ValueError(f"relay description: {name} codec {codec} is not {kind}")
    return TrackInfo(ssrc, track_id, kind, payload_type, codec)


def parse_description(value: object) -> RelayDescription:
    """Validate a decoded description (a dict); ValueError says what is wrong."""
    if not isinstance(value, dict):
        raise ValueError("relay description must be a JSON object")
    missing = [key for key in _FIELDS if key not in value]
    if missing:
        raise ValueError(f"relay description: missing field(s) {', '.join(missing)}")
    unknown = sorted(str(key) for key in value if key not in _FIELDS)
    if unknown:
        raise ValueError(f"relay description: unknown field(s) {', '.join(unknown)}")
    if value["v"] != DESCRIPTION_VERSION or isinstance(value["v"], bool):
        raise ValueError(f"relay description: unsupported version {value['v']!r}")
    ufrag = _string(value["u"], "ICE usernameFragment (u)", _ICE_CHARS, 4, 256)
    password = _string(value["p"], "ICE password (p)", _ICE_CHARS, 22, 256)
    encoded = value["f"]
    if not isinstance(encoded, str):
        raise ValueError("relay description: fingerprint (f) must be a base64 string")
    try:
        fingerprint = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("relay description: fingerprint (f) is not valid base64") from exc
    if len(fingerprint) != 32:
        raise ValueError("relay description: fingerprint (f) must be a SHA-256 digest (32 bytes)")
    role = value["d"]
    if role not in ("s", "c"):
        raise ValueError('relay description: DTLS role (d) must be "s" or "c"')
    candidates = value["c"]
    if not isinstance(candidates, list):
        raise ValueError("relay description: candidates (c) must be a list")
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise ValueError(f"relay description: 1-{MAX_CANDIDATES} candidates (c) are needed")
    tracks = value["t"]
    if not isinstance(tracks, list):
        raise ValueError("relay description: tracks (t) must be a list")
    if len(tracks) > MAX_TRACKS:
        raise ValueError(f"relay description: more than {MAX_TRACKS} tracks (t)")
    parsed_tracks = tuple(parse_track(track, index) for index, track in enumerate(tracks))
    if len({track.ssrc for track in parsed_tracks}) != len(parsed_tracks):
        raise ValueError("relay description: two tracks share an SSRC")
    if len({track.track_id for track in parsed_tracks}) != len(parsed_tracks):
        raise ValueError("relay description: two entries share a track id")
    return RelayDescription(
        ice_ufrag=ufrag,
        ice_password=password,
        fingerprint_sha256=fingerprint,
        dtls_role="server" if role == "s" else "client",
        candidates=tuple(_candidate(c, index) for index, c in enumerate(candidates)),
        tracks=parsed_tracks,
    )


def encode_description(description: Mapping[str, Any] | RelayDescription) -> bytes:
    """Compact JSON (UTF-8) of a validated description; ValueError if it is invalid or
    longer than `MAX_DESCRIPTION_BYTES`."""
    parsed = (
        description
        if isinstance(description, RelayDescription)
        else parse_description(dict(description))
    )
    data = json.dumps(parsed.wire(), separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_DESCRIPTION_BYTES:
        raise ValueError(
            f"relay description is {len(data)} bytes, more than {MAX_DESCRIPTION_BYTES} "
            f"({len(parsed.tracks)} tracks, {len(parsed.candidates)} candidates)"
        )
    return data


def decode_description(data: bytes | str) -> dict[str, Any]:
    """Parse and validate an encoded description; ValueError on anything wrong with it."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_DESCRIPTION_BYTES:
        raise ValueError(f"relay description is {size} bytes, more than {MAX_DESCRIPTION_BYTES}")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"relay description is not JSON: {exc}") from exc
    return parse_description(value).wire()
