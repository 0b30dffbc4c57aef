"""announce_addresses: what a node behind 1:1 NAT tells clients."""

from __future__ import annotations

from node.media.sdp import announce_addresses, answer_simulcast, media_sections, offered_rids

SDP = "\r\n".join(
    [
        "v=0",
        "m=video 50000 UDP/TLS/RTP/SAVPF 97",
        "c=IN IP4 10.0.0.5",
        "a=candidate:abc 1 udp 2130706431 10.0.0.5 50000 typ host",
        "a=candidate:def 1 udp 1694498815 198.51.100.9 50000 typ srflx raddr 10.0.0.5 rport 50000",
        "a=end-of-candidates",
        "",
    ]
)


def test_no_addresses_keeps_the_sdp() -> None:
    assert announce_addresses(SDP, []) == SDP


def test_host_candidates_announced_on_the_given_addresses() -> None:
    out = announce_addresses(SDP, ["203.0.113.7", "2001:db8::7"])
    lines = out.split("\r\n")
    assert "a=candidate:abc 1 udp 2130706431 203.0.113.7 50000 typ host" in lines
    assert "a=candidate:abc1 1 udp 2130706431 2001:db8::7 50000 typ host" in lines
    assert not any(" 10.0.0.5 50000 typ host" in line for line in lines)
    # other candidate types and lines are kept as they were
    assert SDP.split("\r\n")[4] in lines
    assert "c=IN IP4 203.0.113.7" in lines
    assert out.endswith("\r\n")


def test_duplicate_addresses_give_one_candidate() -> None:
    out = announce_addresses(SDP, ["203.0.113.7", "203.0.113.7"])
    assert out.count("203.0.113.7 50000 typ host") == 1


def test_media_sections_count_every_m_line_with_its_direction() -> None:
    sdp = "\r\n".join(
        [
            "v=0",
            "a=recvonly",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=sendonly",
            "m=video 9 UDP/TLS/RTP/SAVPF 97",
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
            "a=inactive",
        ]
    )
    sections = media_sections(sdp)
    assert [(s.kind, s.direction, s.sending) for s in sections] == [
        ("audio", "sendonly", True),
        ("video", "recvonly", False),
        ("application", "inactive", False),
    ]


def test_media_sections_know_their_mids() -> None:
    sdp = "v=0\nm=audio 9 RTP 111\na=mid:0\na=sendonly\nm=video 9 RTP 97\na=mid:v1\n"
    assert [s.mid for s in media_sections(sdp)] == ["0", "v1"]


CHROME_SIMULCAST = "\r\n".join(
    [
        "v=0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:0",
        "a=sendonly",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "a=mid:1",
        "a=sendonly",
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
        "a=rid:q send",
        "a=rid:h send",
        "a=rid:f send",
        "a=rid:bad! send",
        "a=simulcast:send q;h;~f",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "a=mid:2",
        "a=sendonly",
        "",
    ]
)


def test_offered_rids_per_mid_lowest_first() -> None:
    # only m-lines with simulcast; a paused (~) RID is taken; an invalid one is not
    assert offered_rids(CHROME_SIMULCAST) == {"1": ("q", "h", "f")}
    assert offered_rids(SDP) == {}


def test_answer_gets_rid_recv_and_simulcast_recv_on_its_mlines() -> None:
    answer = "\r\n".join(
        ["v=0", "m=audio 9 X 111", "a=mid:0", "m=video 9 X 96", "a=mid:1", "a=recvonly", ""]
    )
    out = answer_simulcast(answer, {"1": ("q", "h", "f")})
    lines = out.split("\r\n")
    video = lines[lines.index("m=video 9 X 96") :]
    assert video[-5:] == [
        "a=rid:q recv",
        "a=rid:h recv",
        "a=rid:f recv",
        "a=simulcast:recv q;h;f",
        "",
    ]
    assert "a=rid" not in out.split("m=video")[0]
    assert answer_simulcast(answer, {}) == answer
