"""Text edits of the node's own SDP before it goes to a client, and the light reading of a
client's SDP that must happen before aiortc parses it (what the caps count, which of its
ICE candidates the node may probe)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})


@dataclass(frozen=True)
class MediaSection:
    """One m-line of an SDP and the direction its section states (sendrecv by default)."""

    kind: str
    direction: str
    mid: str = ""

    @property
    def sending(self) -> bool:
        """Whether the SDP's author sends on it (a track it publishes)."""
        return self.direction in ("sendrecv", "sendonly")


def media_sections(sdp: str) -> list[MediaSection]:
    """The m-lines of `sdp`, in order, read as plain text: one pass, no parser that could
    be made to work harder than the text is long."""
    sections: list[list[str]] = []  # kind, direction, mid
    session_direction = "sendrecv"
    for raw in sdp.split("\n"):
        line = raw.rstrip("\r")
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            sections.append([kind, "", ""])
        elif line.startswith("a=") and line[2:] in _DIRECTIONS:
            if sections:
                sections[-1][1] = line[2:]
            else:
                session_direction = line[2:]
        elif line.startswith("a=mid:") and sections:
            sections[-1][2] = line[6:].strip()
    return [
        MediaSection(kind, direction or session_direction, mid) for kind, direction, mid in sections
    ]


def announce_addresses(sdp: str, addresses: Sequence[str]) -> str:
    """`sdp` with each host candidate announced on `addresses` instead of its own address
    (same port, one candidate per address), and `c=` lines naming a host address rewritten
    to the first: what a node behind 1:1 NAT must tell clients. Other lines are kept."""
    if not addresses:
        return sdp
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    hosts: set[str] = set()
    out: list[str] = []
    for line in lines:
        fields = line.split()
        if line.startswith("a=candidate:") and len(fields) >= 8 and fields[7] == "host":
            hosts.add(fields[4])
            seen: set[tuple[str, str]] = set()
            for index, address in enumerate(addresses):
                key = (address, fields[5])
                if key in seen:
                    continue
                seen.add(key)
                foundation = fields[0] if index == 0 else f"{fields[0]}{index}"
                out.append(" ".join([foundation, *fields[1:4], address, *fields[5:]]))
            continue
        out.append(line)
    for index, line in enumerate(out):
        if line.startswith("c=IN IP"):
            fields = line.split()
            if len(fields) == 3 and fields[2] in hosts:
                family = "IP6" if ":" in addresses[0] else "IP4"
                out[index] = f"c=IN {family} {addresses[0]}"
    return newline.join(out)


def candidate_refusal(address: str, allow_private: bool) -> str | None:
    """Why the node must not send connectivity checks to `address` (a client's ICE
    candidate), or None. Never: unspecified, multicast, link-local, reserved (broadcast).
    Only with `allow_private`: loopback, private and other non-global addresses (the node's
    own networks, which a client on the internet cannot own) and mDNS names (`*.local`,
    resolved on the node's own network)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if allow_private and address.lower().endswith(".local"):
            return None
        return "a candidate must name an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return "the candidate's address cannot be a client's"
    if not ip.is_global and not allow_private:
        return "the candidate's address is not a public one"
    return None


def filter_candidates(sdp: str, keep: Callable[[str], bool]) -> str:
    """`sdp` without the a=candidate lines `keep` refuses (it is given the line's value,
    after "a=candidate:")."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    kept = [
        line
        for line in lines
        if not line.startswith("a=candidate:") or keep(line.removeprefix("a=candidate:"))
    ]
    return sdp if len(kept) == len(lines) else newline.join(kept)


#: at most this many encodings of one track are taken (what browsers send: 3)
MAX_LAYERS = 3
_RID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def offered_rids(sdp: str) -> dict[str, tuple[str, ...]]:
    """mid -> the RIDs a publisher's offer sends on that m-line (RFC 8853
    `a=simulcast:send`, each with its `a=rid:<id> send`), in the order listed, which the
    node takes as lowest layer first; m-lines without simulcast are left out. Paused
    (`~`) and alternative (`,`) RIDs are taken as plain ones; at most `MAX_LAYERS`."""
    found: dict[str, tuple[str, ...]] = {}
    mid = ""
    rids: set[str] = set()
    listed: list[str] = []

    def close() -> None:
        wanted = tuple(r for r in listed if r in rids)[:MAX_LAYERS]
        if mid and len(wanted) > 1:
            found[mid] = wanted

    for raw in sdp.split("\n"):
        line = raw.rstrip("\r")
        if line.startswith("m="):
            close()
            mid, rids, listed = "", set(), []
        elif line.startswith("a=mid:"):
            mid = line[6:].strip()
        elif line.startswith("a=rid:"):
            fields = line[6:].split()
            if len(fields) >= 2 and fields[1] == "send" and set(fields[0]) <= _RID_CHARS:
                rids.add(fields[0][:16])
        elif line.startswith("a=simulcast:"):
            fields = line[12:].split()
            if len(fields) >= 2 and fields[0] == "send":
                for alternatives in fields[1].split(";"):
                    rid = alternatives.split(",")[0].removeprefix("~")
                    if rid and rid not in listed:
                        listed.append(rid)
    close()
    return found


def answer_simulcast(sdp: str, rids: dict[str, tuple[str, ...]]) -> str:
    """The node's answer with `a=rid:<id> recv` and `a=simulcast:recv` added to each m-line
    whose mid is in `rids` (what a browser needs to send its encodings)."""
    if not rids:
        return sdp
    newline = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    pending: tuple[str, ...] = ()

    def flush() -> None:
        out.extend(f"a=rid:{rid} recv" for rid in pending)
        if pending:
            out.append("a=simulcast:recv " + ";".join(pending))

    lines = sdp.split(newline)
    trailing = lines[-1] == ""
    if trailing:
        lines = lines[:-1]
    for line in lines:
        if line.startswith("m="):
            flush()
            pending = ()
        elif line.startswith("a=mid:"):
            pending = rids.get(line[6:].strip(), ())
        out.append(line)
    flush()
    return newline.join(out) + (newline if trailing else "")
