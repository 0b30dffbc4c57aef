"""node/lab/topology.py: the topology file, its defaults and its errors (line + field)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from node.lab.params import GilbertElliott, LinkParams
from node.lab.topology import (
    PROFILES,
    Role,
    TopologyError,
    load_topology,
    parse_topology,
    with_core,
)

GOOD = """\
[lab]
seed = 7

[regions.a]
description = "A"

[regions.b]

[hosts.n1]
region = "a"
role = "node"

[hosts.c1]
region = "b"
role = "client"
access = { profile = "4g", uplink_mbps = 2 }

[hosts.c2]
region = "b"
role = "client"
address = "198.18.1.9"
access = "fiber"

[core.a.b]
delay_ms = 50
jitter_ms = 3
loss = 0.01
rate_mbps = 20
queue_ms = 40
burst = { p_good_to_bad = 0.01, p_bad_to_good = 0.5, loss_bad = 0.8 }
"""


def test_a_good_file_parses_into_typed_values() -> None:
    t = parse_topology(GOOD, "good.toml")
    assert t.seed == 7
    assert list(t.regions) == ["a", "b"]
    assert t.regions["a"].description == "A"
    assert t.hosts["n1"].role is Role.NODE
    assert t.hosts["n1"].address == ipaddress.IPv4Address("198.18.0.1")
    assert t.hosts["c2"].address == ipaddress.IPv4Address("198.18.1.9")
    link = t.core[("a", "b")]
    assert link == LinkParams(
        delay_ms=50,
        jitter_ms=3,
        loss=0.01,
        rate_mbps=20,
        queue_ms=40,
        burst=GilbertElliott(0.01, 0.5, 0.8),
    )
    # one direction given: the other copies it
    assert t.core[("b", "a")] == link
    c1 = t.hosts["c1"].access
    assert c1 is not None and c1.profile == "4g"
    assert c1.uplink.rate_mbps == 2
    assert c1.downlink.rate_mbps == PROFILES["4g"].downlink_mbps
    assert c1.uplink.delay_ms == PROFILES["4g"].delay_ms
    assert [name for name, _ in t.path("n1", "c1")] == ["a->b", "c1/down"]
    assert [name for name, _ in t.path("c1", "c2")] == ["c1/up", "c2/down"]
    assert t.host_at(ipaddress.IPv4Address("198.18.1.9")) == t.hosts["c2"]


def test_both_directions_may_differ() -> None:
    text = GOOD + "\n[core.b.a]\ndelay_ms = 70\n"
    t = parse_topology(text)
    assert t.core[("a", "b")].delay_ms == 50
    assert t.core[("b", "a")].delay_ms == 70


def test_the_default_topology_ships_with_the_findings_figures() -> None:
    t = load_topology()
    assert {h.name: (h.region, h.role) for h in t.hosts.values()} == {
        "eu-peer": ("ams", Role.CLIENT),
        "sg-node": ("sg", Role.NODE),
        "redis": ("sg", Role.REDIS),
        "store": ("sg", Role.STORE),
        "hcm-node": ("hcm", Role.NODE),
        "vn-peer": ("hcm", Role.CLIENT),
    }
    # RTT Amsterdam-Singapore ~160 ms, Amsterdam-Vietnam ~225-233, Singapore-HCM ~35
    assert 2 * t.core[("ams", "sg")].delay_ms == pytest.approx(158.6)
    assert 225 <= 2 * t.core[("ams", "hcm")].delay_ms <= 233
    assert 2 * t.core[("sg", "hcm")].delay_ms == pytest.approx(35)
    assert all(h.address in ipaddress.IPv4Network("198.18.0.0/15") for h in t.hosts.values())


def _error(text: str) -> TopologyError:
    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "bad.toml")
    return caught.value


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "field", "needle"),
    [
        # unknown key in a core link (a misspelt jitter must not mean "no jitter")
        ("jitter_ms = 3", "jiter_ms = 3", "core.a.b.jiter_ms", "jiter_ms"),
        # wrong type
        ('role = "node"', "role = 3", "hosts.n1.role", "role = 3"),
        # a role that does not exist
        ('role = "node"', 'role = "router"', "hosts.n1.role", "router"),
        # out of range
        ("loss = 0.01", "loss = 1.5", "core.a.b.loss", "loss = 1.5"),
        ("delay_ms = 50", "delay_ms = -1", "core.a.b.delay_ms", "delay_ms = -1"),
        # a field inside an inline table: the line of that table
        ("loss_bad = 0.8", "loss_bad = 2", "core.a.b.burst.loss_bad", "burst ="),
        ("uplink_mbps = 2 }", "uplinc = 2 }", "hosts.c1.access.uplinc", "uplinc"),
        # references
        ('access = "fiber"', 'access = "dsl"', "hosts.c2.access", "dsl"),
        ('region = "a"', 'region = "z"', "hosts.n1.region", '"z"'),
        # addresses outside the lab range, or taken twice
        ('address = "198.18.1.9"', 'address = "10.0.0.1"', "hosts.c2.address", "10.0.0.1"),
        ("[lab]\nseed = 7", "[lab]\nseed = 7\nsead = 1", "lab.sead", "sead"),
        # names make stage names (HOST/up, A->B): no separators in them
        ("[hosts.c2]", '[hosts."c/2"]', "hosts.c/2", "c/2"),
    ],
)
def test_bad_files_name_the_line_and_the_field(old: str, new: str, field: str, needle: str) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    error = _error(text)
    assert error.field == field
    assert error.line == _line(text, needle)
    assert f"bad.toml:{error.line}: {field}:" in str(error)


def test_a_missing_key_names_its_table() -> None:
    text = GOOD.replace('region = "b"\nrole = "client"\naddress', 'role = "client"\naddress')
    error = _error(text)
    assert error.field == "hosts.c2.region"
    assert error.line == _line(text, "[hosts.c2]")


def test_a_missing_pair_is_named() -> None:
    text = GOOD + "\n[regions.c]\n\n[core.c.a]\ndelay_ms = 5\n"
    error = _error(text)
    assert error.field == "core.b.c"
    assert "'b' and 'c'" in error.message


def test_a_duplicate_address_is_an_error() -> None:
    text = GOOD.replace('role = "node"', 'role = "node"\naddress = "198.18.1.9"')
    error = _error(text)
    assert error.field == "hosts.c2.address"
    lines = text.splitlines()
    assert lines[error.line - 1] == 'address = "198.18.1.9"'
    assert lines[error.line - 2] == 'role = "client"'
    assert "n1" in error.message


def test_syntax_errors_name_their_line() -> None:
    text = GOOD.replace("delay_ms = 50", "delay_ms = = 50")
    error = _error(text)
    assert error.line == _line(text, "= = 50")


def test_a_missing_file_is_a_topology_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="<file>"):
        load_topology(tmp_path / "none.toml")


def test_a_variant_changes_one_direction_of_one_core_link() -> None:
    t = parse_topology(GOOD)
    worse = with_core(t, "a", "b", delay_ms=130, loss=0.02)
    assert worse.core[("a", "b")].delay_ms == 130
    assert worse.core[("a", "b")].loss == 0.02
    assert worse.core[("a", "b")].burst == t.core[("a", "b")].burst
    assert worse.core[("b", "a")] == t.core[("b", "a")]
    assert t.core[("a", "b")].delay_ms == 50  # the original is untouched
