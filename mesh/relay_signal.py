"""The relay's signalling messages between nodes: what they carry, and their size bound.

Nodes talk over Serf queries addressed to one node (`FilterNodes`); the query's response is
the reply. Serf refuses a query or response over 1 KB with its envelope (FINDINGS), so every
message, request and reply, is compact JSON of at most `MAX_MESSAGE_BYTES`, checked when it
is built.

Requests (`n`: sending node, `b`: its boot id, `l`: the link id, `r`: request id):

* `offer`  `{d: description, k: link id the sender knew for this pair ("" if none)}`
* `tracks` `{s: sequence number, a: [track, ...] added, x: [track id, ...] removed}`: the
  sender's tracks after the link is up, as deltas split to fit (`track_updates`).
* `close`  the sender closed the link (idle after its linger, or shutting down).
* `needs`  `{w: [[track id, need], ...]}`: what the sender's subscribers need of tracks it
  receives over the link (simulcast layer selection): the height of a tile one is shown in,
  0 when nobody shows it, -1 when unknown (any layer). A track id may come several times:
  its subscribers' different needs (a small and a large tile), each a layer the link then
  carries. Absolute values, the whole set of a track in one message, so a message split to
  fit (`needs_updates`, only between tracks) or repeated changes nothing more.

Replies: `answer {d: description}`, `ok`, or `refuse {e: reason}` ("glare", "unknown-link",
"bad", "gap", "busy").

`d` is `node.relay.link`'s description (ICE ufrag/password/candidates, DTLS fingerprint and
role, tracks as [ssrc, id, kind, payload type, codec]); an offer or answer carries as many of
the sender's tracks as fit, the rest follow as `tracks` updates.

With the "redis" carrier a message is stored under a short-lived Redis key and the query
carries only `{"ptr": key}` (see `node.relay.manager.RelayManager`).

**Sealing.** Serf tells a receiver nothing it can trust about who sent a query: anyone with
the gossip key, or with RPC access to any agent, can send one that claims any `n`. So every
message on the wire is sealed (`seal`) with the cluster's relay key: `t` (when it was sealed,
ms since the epoch) and, last, `h`, an HMAC-SHA256 (base64url, unpadded) over the bytes before
it, bound to the recipient's node name (a message for one node is worthless at another).
`unseal` checks the MAC (constant time) and the time window; refusing a replayed request id
within the window is the receiver's (it needs somewhere to remember ids). A seal adds at most
`SEAL_BYTES`, which `encode` already counts, so a sealed message fits `MAX_MESSAGE_BYTES`.
The key is passed in: this codec knows nothing of settings or of Serf.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from mesh.relay_description import MAX_TRACKS, TrackInfo, parse_description, parse_track

#: Serf refuses a query whose encoded envelope exceeds 1,024 bytes (`QuerySizeLimit`), and
#: the envelope carries both node names besides the payload: measured with real agents, the
#: largest payload between two 63-character names (the longest `_NODE` allows) was 769 bytes
#: on fresh agents with a sub-4 s timeout (889 between 6-character names); a timeout over
#: 4.29 s takes 4 bytes more, a Lamport time past 2^16 up to 8 more: hence 752. A response
#: has more room. 1,000 here made every offer, answer or update over ~850 bytes fail at Serf
#: ("query exceeds limit"), so a relay opened for many tracks never came up.
MAX_MESSAGE_BYTES: Final = 752
QUERY_NAME: Final = "sfumesh-relay"
KINDS: Final = ("offer", "answer", "tracks", "close", "needs", "ok", "refuse")
REQUESTS: Final = ("offer", "tracks", "close", "needs")
#: a `needs` value: -1 (unknown) up to the tallest tile height a client may state
NEED_MIN: Final = -1
NEED_MAX: Final = 16384

_NODE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_REASON: Final = re.compile(r"[a-z-]{1,32}")
_POINTER: Final = re.compile(r"sfumesh:relay-msg:[A-Za-z0-9_-]{8,64}")

#: the shortest relay key accepted (bytes): as strong as the HMAC it keys
KEY_MIN_BYTES: Final = 32
_MAC_CHARS: Final = 43  # base64url of a SHA-256 digest, unpadded
_STAMP_DIGITS: Final = 13  # milliseconds since the epoch, until the year 2286
#: what a seal adds to an encoded message: `,"t":<ms>` and `,"h":"<mac>"`
SEAL_BYTES: Final = len(',"t":') + _STAMP_DIGITS + len(',"h":""') + _MAC_CHARS
#: what a message may take before its seal
MAX_BODY_BYTES: Final = MAX_MESSAGE_BYTES - SEAL_BYTES
_MAC_DOMAIN: Final = b"sfumesh-relay-v1"
_SEALED: Final = re.compile(rb'(\{.*),"h":"([A-Za-z0-9_-]{%d})"\}' % _MAC_CHARS, re.DOTALL)


def new_id() -> str:
    """A random id for a link, a request or a node's boot."""
    return secrets.token_urlsafe(9)


@dataclass(frozen=True)
class Message:
    """One signalling message (validated by `decode`)."""

    kind: str
    request: str
    node: str = ""
    boot: str = ""
    link: str = ""
    description: dict[str, Any] | None = None
    known_link: str = ""
    seq: int = 0
    added: tuple[TrackInfo, ...] = ()
    removed: tuple[str, ...] = ()
    reason: str = ""
    #: `needs`: (track id, need) pairs
    needs: tuple[tuple[str, int], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    #: when it was sealed (ms since the epoch), as `decode` read it; 0 if it was not
    stamp: int = 0

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"m": self.kind, "r": self.request}
        if self.node:
            out["n"] = self.node
        if self.boot:
            out["b"] = self.boot
        if self.link:
            out["l"] = self.link
        if self.description is not None:
            out["d"] = self.description
        if self.kind == "offer":
            out["k"] = self.known_link
        if self.kind == "tracks":
            out["s"] = self.seq
            out["a"] = [track.wire() for track in self.added]
            out["x"] = list(self.removed)
        if self.kind == "needs":
            out["w"] = [[track_id, need] for track_id, need in self.needs]
        if self.reason:
            out["e"] = self.reason
        return out


def encode(message: Message) -> bytes:
    """Compact JSON, unsealed; ValueError if it would take more than `MAX_MESSAGE_BYTES`
    once sealed (the caller splits or trims)."""
    data = json.dumps(message.wire(), separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_BODY_BYTES:
        raise ValueError(
            f"relay message is {len(data) + SEAL_BYTES} bytes sealed, more than {MAX_MESSAGE_BYTES}"
        )
    return data


class Unauthentic(ValueError):
    """A message without a valid seal; `reason` says which way: "unsealed" (no seal),
    "bad-mac" (another key, another recipient or altered) or "stale" (outside the window)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"relay message: {detail}")
        self.reason = reason


def _mac(key: bytes, recipient: str, body: bytes) -> bytes:
    digest = hmac.new(
        key, _MAC_DOMAIN + b"\n" + recipient.encode() + b"\n" + body, hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def check_key(key: bytes) -> bytes:
    """`key` if it is long enough to be a relay key; ValueError otherwise."""
    if len(key) < KEY_MIN_BYTES:
        raise ValueError(f"the relay key must be at least {KEY_MIN_BYTES} bytes")
    return key


def seal(message: Message, key: bytes, *, to: str, now: float) -> bytes:
    """`message` encoded and sealed for node `to` at `now` (seconds since the epoch)."""
    check_key(key)
    stamp = int(now * 1000)
    if not 0 < stamp < 10**_STAMP_DIGITS:
        raise ValueError(f"relay message: cannot seal at time {now}")
    body = encode(message)[:-1] + b',"t":%d}' % stamp
    return body[:-1] + b',"h":"' + _mac(key, to, body) + b'"}'


def unseal(data: bytes, key: bytes, *, me: str, now: float, window_s: float) -> Message:
    """The message in `data` if it was sealed with `key` for node `me` no more than
    `window_s` from `now` (either way: clocks differ); `Unauthentic` if not, ValueError if
    it is sealed but not a valid message. Nothing but the MAC is parsed before the MAC is
    checked."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"relay message is {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    sealed = _SEALED.fullmatch(data)
    if sealed is None:
        raise Unauthentic("unsealed", "not sealed")
    body = sealed[1] + b"}"
    if not hmac.compare_digest(_mac(check_key(key), me, body), sealed[2]):
        raise Unauthentic("bad-mac", "bad MAC")
    message = decode(body)
    if not message.stamp:
        raise Unauthentic("stale", "sealed without a time")
    if abs(now * 1000 - message.stamp) > window_s * 1000:
        raise Unauthentic("stale", "sealed outside the time window")
    return message


def _field(value: dict[str, Any], name: str, pattern: re.Pattern[str], required: bool) -> str:
    raw = value.get(name, "")
    if not isinstance(raw, str) or (raw and not pattern.fullmatch(raw)) or (required and not raw):
        raise ValueError(f"relay message: bad or missing field {name!r}")
    return raw


def decode(data: bytes, *, limit: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate a message; ValueError says what is wrong with it."""
    if len(data) > limit:
        raise ValueError(f"relay message is {len(data)} bytes, more than {limit}")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"relay message is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("relay message must be a JSON object")
    kind = value.get("m")
    if kind not in KINDS:
        raise ValueError(f"relay message: unknown kind {kind!r}")
    request = _field(value, "r", _TOKEN, True)
    is_request = kind in REQUESTS
    node = _field(value, "n", _NODE, is_request)
    boot = _field(value, "b", _TOKEN, is_request)
    link = _field(value, "l", _TOKEN, is_request)
    description = None
    if kind in ("offer", "answer"):
        description = parse_description(value.get("d")).wire()
    known = _field(value, "k", _TOKEN, False) if kind == "offer" else ""
    seq = 0
    added: tuple[TrackInfo, ...] = ()
    removed: tuple[str, ...] = ()
    if kind == "tracks":
        raw_seq = value.get("s")
        if isinstance(raw_seq, bool) or not isinstance(raw_seq, int) or not 1 <= raw_seq < 2**53:
            raise ValueError("relay message: s must be a positive integer")
        seq = raw_seq
        raw_added, raw_removed = value.get("a"), value.get("x")
        if not isinstance(raw_added, list) or not isinstance(raw_removed, list):
            raise ValueError("relay message: a and x must be lists")
        if len(raw_added) + len(raw_removed) > MAX_TRACKS:
            raise ValueError(f"relay message: more than {MAX_TRACKS} track changes")
        added = tuple(parse_track(track, index) for index, track in enumerate(raw_added))
        removed = tuple(
            parse_track([1, track_id, "a", 0, "opus"], index).track_id
            for index, track_id in enumerate(raw_removed)
        )
    needs: tuple[tuple[str, int], ...] = ()
    if kind == "needs":
        needs = _needs(value.get("w"))
    reason = _field(value, "e", _REASON, kind == "refuse")
    stamp = value.get("t", 0)
    if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 10**_STAMP_DIGITS:
        raise ValueError("relay message: t must be a time in milliseconds")
    return Message(
        kind=kind,
        request=request,
        node=node,
        boot=boot,
        link=link,
        description=description,
        known_link=known,
        seq=seq,
        added=added,
        removed=removed,
        reason=reason,
        needs=needs,
        stamp=stamp,
    )


def _needs(raw: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TRACKS:
        raise ValueError(f"relay message: w must be a list of 1 to {MAX_TRACKS} pairs")
    out: list[tuple[str, int]] = []
    for index, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("relay message: each need is [track id, value]")
        track_id = parse_track([1, pair[0], "v", 0, "VP8"], index).track_id
        need = pair[1]
        if isinstance(need, bool) or not isinstance(need, int) or not NEED_MIN <= need <= NEED_MAX:
            raise ValueError(f"relay message: a need is an integer from {NEED_MIN} to {NEED_MAX}")
        out.append((track_id, need))
    return tuple(out)


def needs_updates(header: Message, needs: Sequence[tuple[str, int]]) -> list[Message]:
    """`needs` messages carrying these values, each under the size bound; the pairs of one
    track stay in one message (the receiver takes a message's set of a track as whole)."""
    messages: list[Message] = []
    current: list[tuple[str, int]] = []

    def build(pairs: list[tuple[str, int]]) -> Message:
        return replace(header, kind="needs", request=new_id(), needs=tuple(pairs))

    groups: dict[str, list[tuple[str, int]]] = {}
    for pair in needs:
        groups.setdefault(pair[0], []).append(pair)
    for group in groups.values():
        trial = [*current, *group]
        try:
            if len(trial) > MAX_TRACKS:
                raise ValueError("too many")
            encode(build(trial))
            current = trial
        except ValueError:
            if not current:
                raise
            messages.append(build(current))
            current = list(group)
    if current:
        messages.append(build(current))
    return messages


def fit_description(message: Message) -> tuple[Message, list[dict[str, Any]]]:
    """`message` (an offer or answer) with as many of its description's tracks as fit under
    the size bound; the tracks left out (wire form) are to follow as `tracks` updates."""
    if message.description is None:
        return message, []
    tracks = list(message.description.get("t", []))
    left: list[dict[str, Any]] = []
    while True:
        trimmed = Message(
            **{**message.__dict__, "description": {**message.description, "t": tracks}}
        )
        try:
            encode(trimmed)
            return trimmed, left
        except ValueError:
            if not tracks:
                raise
            left.insert(0, tracks.pop())


def track_updates(
    header: Message,
    first_seq: int,
    added: Sequence[TrackInfo],
    removed: Iterable[str],
) -> list[Message]:
    """`tracks` messages (numbered from `first_seq`) carrying these changes, each under the
    size bound; removals go first so that a re-added id is never seen twice at once."""
    changes: list[TrackInfo | str] = [*removed, *added]
    messages: list[Message] = []
    current_added: list[TrackInfo] = []
    current_removed: list[str] = []

    def build(seq: int, a: list[TrackInfo], x: list[str]) -> Message:
        return Message(
            kind="tracks",
            request=new_id(),
            node=header.node,
            boot=header.boot,
            link=header.link,
            seq=seq,
            added=tuple(a),
            removed=tuple(x),
        )

    for change in changes:
        trial_added = current_added + ([change] if isinstance(change, TrackInfo) else [])
        trial_removed = current_removed + ([change] if isinstance(change, str) else [])
        try:
            encode(build(first_seq + len(messages), trial_added, trial_removed))
            current_added, current_removed = trial_added, trial_removed
        except ValueError:
            if not current_added and not current_removed:
                raise
            messages.append(build(first_seq + len(messages), current_added, current_removed))
            current_added = [change] if isinstance(change, TrackInfo) else []
            current_removed = [change] if isinstance(change, str) else []
    if current_added or current_removed:
        messages.append(build(first_seq + len(messages), current_added, current_removed))
    return messages


def is_pointer(value: Any) -> bool:
    return isinstance(value, str) and bool(_POINTER.fullmatch(value))
