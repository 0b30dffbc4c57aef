"""Text edits of the node's own SDP before it goes to a client."""

from __future__ import annotations

from collections.abc import Sequence


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
