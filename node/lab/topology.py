"""The lab's topology file: regions, the hosts in them, the links between them (TOML).

The format is part of the public contract (README, "WAN lab"): people bring their own files,
so a bad file gets a `TopologyError` naming the line and the field, and unknown keys are
errors (a misspelt `jiter_ms` must not silently mean "no jitter").

    [lab]                       # optional
    seed = 1                    # seeds every random choice of the emulator
    jitter_correlation_ms = 20  # default for every link

    [regions.sg]
    description = "Singapore"   # optional

    [hosts.sg-node]
    region = "sg"
    role = "node"               # node | client | redis | store
    address = "198.18.0.2"      # optional; else the next free one in 198.18.0.0/15
    access = "4g"               # optional: a profile name, or an inline table (below)

    [core.eu.sg]                # one direction, eu -> sg
    delay_ms = 80               # one-way
    jitter_ms = 1
    loss = 0.0                  # fraction
    rate_mbps = 1000            # optional
    queue_ms = 100              # optional (drop-tail queue, in ms at rate_mbps)
    burst = { p_good_to_bad = 0.001, p_bad_to_good = 0.3, loss_bad = 0.5 }  # optional

Region and host names are 1-64 letters, digits, `-` or `_`. Every pair of different
regions needs a `[core.A.B]`; if only one direction is given the other copies it
(symmetric fill), else each direction has its own. Hosts of one region reach each other
with no core stage unless `[core.A.A]` is given.

Access links (any host may have one; clients usually do): `uplink_mbps`, `downlink_mbps`,
`delay_ms` (one-way, added in each direction), `jitter_ms`, `loss` (each direction),
`queue_ms`, `jitter_correlation_ms`. A profile is a name from `PROFILES` or from the file's
own `[profiles.NAME]` tables; an inline table may start from one with `profile = "4g"` and
override some figures.

Only the standard library's `tomllib`, which gives no positions: the line of a field is
found by a small scan of the text for its table header and key (`_line_of`).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Final

from node.lab.params import DEFAULT_QUEUE_MS, GilbertElliott, LinkParams

#: the benchmarking range (RFC 2544): every lab address is in it, nothing else is used
LAB_NETWORK: Final = ipaddress.IPv4Network("198.18.0.0/15")
#: the topology shipped with the project (package data)
DEFAULT_TOPOLOGY: Final = "default.toml"


class Role(StrEnum):
    NODE = "node"
    CLIENT = "client"
    REDIS = "redis"
    STORE = "store"


class TopologyError(ValueError):
    """A bad topology file: where (`source`, `line`, `field`) and what."""

    def __init__(self, source: str, line: int, field: str, message: str) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.message = message
        super().__init__(f"{source}:{line}: {field}: {message}")


@dataclass(frozen=True, slots=True)
class AccessProfile:
    """An access link's figures (the same delay, jitter and loss in each direction)."""

    uplink_mbps: float
    downlink_mbps: float
    delay_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    queue_ms: float = DEFAULT_QUEUE_MS
    jitter_correlation_ms: float | None = None


#: Built-in access profiles. `fiber` and `4g` follow FINDINGS (VN fixed access 4-10 ms RTT,
#: RIPE VN-VN 4.2 ms; VN 4G ~28 ms RTT); `cable` and `3g` are typical figures, not measured.
PROFILES: Final[Mapping[str, AccessProfile]] = {
    "fiber": AccessProfile(uplink_mbps=100, downlink_mbps=300, delay_ms=2.5, jitter_ms=0.5),
    "cable": AccessProfile(uplink_mbps=10, downlink_mbps=100, delay_ms=8, jitter_ms=2, loss=0.0005),
    "4g": AccessProfile(uplink_mbps=8, downlink_mbps=30, delay_ms=14, jitter_ms=4, loss=0.002),
    "3g": AccessProfile(
        uplink_mbps=0.5, downlink_mbps=2, delay_ms=50, jitter_ms=15, loss=0.01, queue_ms=300
    ),
}


@dataclass(frozen=True, slots=True)
class AccessLink:
    """A host's own link to its region: `uplink` carries what it sends, `downlink` what it
    receives. `profile` names the profile it came from (None: all inline)."""

    profile: str | None
    uplink: LinkParams
    downlink: LinkParams


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    region: str
    role: Role
    address: ipaddress.IPv4Address
    access: AccessLink | None = None


#: one emulated stage on a path: its name (ground truth is reported under it) and figures
Stage = tuple[str, LinkParams]


@dataclass(frozen=True, slots=True)
class Topology:
    """A parsed, validated topology. `core` has both directions of every region pair."""

    regions: Mapping[str, Region]
    hosts: Mapping[str, Host]
    core: Mapping[tuple[str, str], LinkParams]
    seed: int = 1
    source: str = "<topology>"

    def host_at(self, address: ipaddress.IPv4Address) -> Host | None:
        """The host with `address`, if any."""
        return next((h for h in self.hosts.values() if h.address == address), None)

    def hosts_with(self, role: Role) -> list[Host]:
        return [h for h in self.hosts.values() if h.role is role]

    def path(self, src: str, dst: str) -> list[Stage]:
        """The stages a packet from host `src` to host `dst` crosses, in order: the sender's
        access uplink, the core link between their regions, the receiver's access downlink
        (each only if there is one). Stage names: `HOST/up`, `A->B`, `HOST/down`."""
        a, b = self.hosts[src], self.hosts[dst]
        stages: list[Stage] = []
        if a.access is not None:
            stages.append((f"{a.name}/up", a.access.uplink))
        core = self.core.get((a.region, b.region))
        if core is not None:
            stages.append((f"{a.region}->{b.region}", core))
        if b.access is not None:
            stages.append((f"{b.name}/down", b.access.downlink))
        return stages


# -- finding lines ----------------------------------------------------------------------

_KEY = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY_PATH = re.compile(rf"\s*{_KEY}(?:\s*\.\s*{_KEY})*")
_ONE_KEY = re.compile(_KEY)
_HEADER = re.compile(rf"^\s*\[\[?\s*({_KEY_PATH.pattern})\s*\]\]?")
_ASSIGN = re.compile(rf"^\s*({_KEY_PATH.pattern})\s*=")


def _split_keys(text: str) -> list[str]:
    keys = []
    for raw in _ONE_KEY.findall(text):
        if raw[:1] in "\"'":
            keys.append(raw[1:-1])
        else:
            keys.append(raw)
    return keys


def _line_of(source_text: str, path: tuple[str, ...]) -> int:
    """The 1-based line that best names `path` (e.g. ("hosts", "x", "role")): the line whose
    table header + key shares the longest prefix with it (the first such line). A key in an
    inline table resolves to the line of that table; a missing key to its table's header."""
    best_line, best_score = 1, 0
    table: list[str] = []
    for number, line in enumerate(source_text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _split_keys(header.group(1))
            here = table
        else:
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            here = [*table, *_split_keys(assign.group(1))]
        score = 0
        for mine, wanted in zip(here, path, strict=False):
            if mine != wanted:
                break
            score += 1
        if score > best_score:
            best_line, best_score = number, score
    return best_line


# -- reading ----------------------------------------------------------------------------


class _Reader:
    """Typed access to the parsed TOML that raises `TopologyError` with line and field."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source

    def fail(self, path: tuple[str, ...], message: str) -> TopologyError:
        return TopologyError(self.source, _line_of(self.text, path), ".".join(path), message)

    def table(
        self,
        value: object,
        path: tuple[str, ...],
        allowed: frozenset[str] | None,
        required: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """`value` as a table with only `allowed` keys (None: any) and every `required` one."""
        if not isinstance(value, dict):
            raise self.fail(path, "must be a table")
        for key in value:
            if allowed is not None and key not in allowed:
                raise self.fail(
                    (*path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})"
                )
        for key in sorted(required):
            if key not in value:
                raise self.fail((*path, key), "missing")
        return value

    def number(
        self,
        table: Mapping[str, Any],
        path: tuple[str, ...],
        key: str,
        default: float | None,
        *,
        low: float = 0.0,
        high: float = float("inf"),
        low_open: bool = False,
    ) -> float | None:
        if key not in table:
            return default
        value = table[key]
        where = (*path, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"must be a number, not {value!r}")
        number = float(value)
        if number != number or number < low or number > high or (low_open and number == low):
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            if high != float("inf"):
                bound = f"within [{low:g}, {high:g}]"
            raise self.fail(where, f"must be {bound}, not {value!r}")
        return number

    def string(self, table: Mapping[str, Any], path: tuple[str, ...], key: str) -> str | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str):
            raise self.fail((*path, key), f"must be a string, not {value!r}")
        return value


_LINK_KEYS: Final = frozenset(
    {"delay_ms", "jitter_ms", "loss", "burst", "rate_mbps", "queue_ms", "jitter_correlation_ms"}
)
_BURST_KEYS: Final = frozenset({"p_good_to_bad", "p_bad_to_good", "loss_bad"})
_PROFILE_KEYS: Final = frozenset(
    {
        "uplink_mbps",
        "downlink_mbps",
        "delay_ms",
        "jitter_ms",
        "loss",
        "queue_ms",
        "jitter_correlation_ms",
    }
)
_HOST_KEYS: Final = frozenset({"region", "role", "address", "access"})


def _req(value: float | None) -> float:
    assert value is not None  # the callers pass a default or checked `required`
    return value


def _core_link(
    r: _Reader, raw: object, path: tuple[str, ...], jitter_correlation_ms: float
) -> LinkParams:
    table = r.table(raw, path, _LINK_KEYS, frozenset({"delay_ms"}))
    burst = None
    if "burst" in table:
        bpath = (*path, "burst")
        braw = r.table(table["burst"], bpath, _BURST_KEYS, frozenset({"p_good_to_bad"}))
        if "p_bad_to_good" not in braw:
            raise r.fail((*bpath, "p_bad_to_good"), "missing")
        burst = GilbertElliott(
            p_good_to_bad=_req(r.number(braw, bpath, "p_good_to_bad", None, high=1)),
            p_bad_to_good=_req(r.number(braw, bpath, "p_bad_to_good", None, high=1, low_open=True)),
            loss_bad=_req(r.number(braw, bpath, "loss_bad", 1.0, high=1)),
        )
    return LinkParams(
        delay_ms=_req(r.number(table, path, "delay_ms", None)),
        jitter_ms=_req(r.number(table, path, "jitter_ms", 0.0)),
        loss=_req(r.number(table, path, "loss", 0.0, high=1)),
        burst=burst,
        rate_mbps=r.number(table, path, "rate_mbps", None, low_open=True),
        queue_ms=_req(r.number(table, path, "queue_ms", DEFAULT_QUEUE_MS)),
        jitter_correlation_ms=_req(
            r.number(table, path, "jitter_correlation_ms", jitter_correlation_ms, low_open=True)
        ),
    )


def _profile(
    r: _Reader, table: Mapping[str, Any], path: tuple[str, ...], base: AccessProfile | None
) -> AccessProfile:
    def get(key: str, default: float | None, **bounds: Any) -> float:
        fallback = default if base is None else getattr(base, key)
        value = r.number(table, path, key, fallback, **bounds)
        if value is None:
            raise r.fail((*path, key), "missing")
        return value

    corr = r.number(table, path, "jitter_correlation_ms", None, low_open=True)
    return AccessProfile(
        uplink_mbps=get("uplink_mbps", None, low_open=True),
        downlink_mbps=get("downlink_mbps", None, low_open=True),
        delay_ms=get("delay_ms", None),
        jitter_ms=get("jitter_ms", 0.0),
        loss=get("loss", 0.0, high=1),
        queue_ms=get("queue_ms", DEFAULT_QUEUE_MS),
        jitter_correlation_ms=corr
        if corr is not None or base is None
        else base.jitter_correlation_ms,
    )


def _access_link(profile: AccessProfile, name: str | None, corr_default: float) -> AccessLink:
    corr = profile.jitter_correlation_ms or corr_default

    def one(rate: float) -> LinkParams:
        return LinkParams(
            delay_ms=float(profile.delay_ms),
            jitter_ms=float(profile.jitter_ms),
            loss=float(profile.loss),
            rate_mbps=float(rate),
            queue_ms=float(profile.queue_ms),
            jitter_correlation_ms=corr,
        )

    return AccessLink(name, uplink=one(profile.uplink_mbps), downlink=one(profile.downlink_mbps))


_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_name(r: _Reader, path: tuple[str, ...]) -> None:
    # stage names are built from them (`HOST/up`, `A->B`): keep them unambiguous
    if not _NAME.fullmatch(path[-1]):
        raise r.fail(path, "a name is 1-64 letters, digits, '-' or '_'")


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    """Parse and validate a topology file's text; `source` names it in errors."""
    r = _Reader(text, source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"line (\d+)", str(error))
        line = int(match.group(1)) if match else 1
        raise TopologyError(source, line, "<syntax>", str(error)) from None
    r.table(doc, (), frozenset({"lab", "regions", "hosts", "core", "profiles"}))
    for key in ("regions", "hosts", "core"):
        if key not in doc:
            raise r.fail((key,), "missing (at least one entry is needed)")

    lab = r.table(doc.get("lab", {}), ("lab",), frozenset({"seed", "jitter_correlation_ms"}))
    seed = lab.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise r.fail(("lab", "seed"), f"must be an integer, not {seed!r}")
    corr = _req(r.number(lab, ("lab",), "jitter_correlation_ms", 20.0, low_open=True))

    regions: dict[str, Region] = {}
    for name, raw in r.table(doc["regions"], ("regions",), None).items():
        _check_name(r, ("regions", name))
        table = r.table(raw, ("regions", name), frozenset({"description"}))
        regions[name] = Region(name, r.string(table, ("regions", name), "description") or "")
    if not regions:
        raise r.fail(("regions",), "no regions")

    profiles = dict(PROFILES)
    for name, raw in r.table(doc.get("profiles", {}), ("profiles",), None).items():
        path = ("profiles", name)
        profiles[name] = _profile(r, r.table(raw, path, _PROFILE_KEYS), path, None)

    hosts: dict[str, Host] = {}
    taken: dict[ipaddress.IPv4Address, str] = {}
    pending: list[tuple[str, dict[str, Any]]] = []
    for name, raw in r.table(doc["hosts"], ("hosts",), None).items():
        path = ("hosts", name)
        _check_name(r, path)
        table = r.table(raw, path, _HOST_KEYS, frozenset({"region", "role"}))
        region = r.string(table, path, "region")
        if region not in regions:
            raise r.fail((*path, "region"), f"unknown region {region!r}")
        role_text = r.string(table, path, "role")
        try:
            Role(str(role_text))
        except ValueError:
            raise r.fail(
                (*path, "role"), f"must be one of {', '.join(Role)}, not {role_text!r}"
            ) from None
        address_text = r.string(table, path, "address")
        if address_text is not None:
            try:
                address = ipaddress.IPv4Address(address_text)
            except ValueError:
                raise r.fail((*path, "address"), f"not an IPv4 address: {address_text!r}") from None
            if address not in LAB_NETWORK or address in (
                LAB_NETWORK.network_address,
                LAB_NETWORK.broadcast_address,
            ):
                raise r.fail((*path, "address"), f"must be a host address in {LAB_NETWORK}")
            if address in taken:
                raise r.fail((*path, "address"), f"{address} is already {taken[address]}'s")
            taken[address] = name
        pending.append((name, table))

    free = (a for a in LAB_NETWORK.hosts() if a not in taken)
    for name, table in pending:
        path = ("hosts", name)
        address_text = table.get("address")
        address = ipaddress.IPv4Address(address_text) if address_text else next(free)
        access = None
        if "access" in table:
            apath = (*path, "access")
            value = table["access"]
            if isinstance(value, str):
                if value not in profiles:
                    raise r.fail(
                        apath,
                        f"unknown profile {value!r} (known: {', '.join(sorted(profiles))})",
                    )
                access = _access_link(profiles[value], value, corr)
            else:
                inline = r.table(value, apath, _PROFILE_KEYS | {"profile"})
                base_name = r.string(inline, apath, "profile")
                if base_name is not None and base_name not in profiles:
                    raise r.fail((*apath, "profile"), f"unknown profile {base_name!r}")
                base = profiles[base_name] if base_name is not None else None
                fields = {k: v for k, v in inline.items() if k != "profile"}
                access = _access_link(_profile(r, fields, apath, base), base_name, corr)
        hosts[name] = Host(name, table["region"], Role(table["role"]), address, access)
    if not hosts:
        raise r.fail(("hosts",), "no hosts")

    core: dict[tuple[str, str], LinkParams] = {}
    for a, row in r.table(doc["core"], ("core",), frozenset(regions)).items():
        for b, raw in r.table(row, ("core", a), frozenset(regions)).items():
            core[(a, b)] = _core_link(r, raw, ("core", a, b), corr)
    for (a, b), link in list(core.items()):
        core.setdefault((b, a), link)
    names = list(regions)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if (a, b) not in core:
                raise r.fail(
                    ("core", a, b), f"no link between regions {a!r} and {b!r} (either direction)"
                )
    return Topology(regions, hosts, core, seed, source)


def read_topology(path: Path | str | None = None) -> tuple[str, str]:
    """A topology file's text and the name errors give it; None: the default topology."""
    if path is None:
        text = resources.files("node.lab").joinpath("topologies", DEFAULT_TOPOLOGY).read_text()
        return text, f"node/lab/topologies/{DEFAULT_TOPOLOGY}"
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8"), str(file)
    except (OSError, UnicodeDecodeError) as error:
        raise TopologyError(str(file), 1, "<file>", str(error)) from None


def load_topology(path: Path | str | None = None) -> Topology:
    """Read and validate a topology file; None: the default topology shipped with the
    project."""
    return parse_topology(*read_topology(path))


def with_core(topology: Topology, a: str, b: str, **changes: Any) -> Topology:
    """A copy of `topology` with the core link a -> b changed (variants of one file)."""
    core = dict(topology.core)
    core[(a, b)] = replace(core[(a, b)], **changes)
    return replace(topology, core=core)


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def _link_fields(link: LinkParams) -> dict[str, object]:
    fields: dict[str, object] = {
        "delay_ms": link.delay_ms,
        "jitter_ms": link.jitter_ms,
        "loss": link.loss,
        "queue_ms": link.queue_ms,
        "jitter_correlation_ms": link.jitter_correlation_ms,
    }
    if link.rate_mbps is not None:
        fields["rate_mbps"] = link.rate_mbps
    if link.burst is not None:
        fields["burst"] = {
            "p_good_to_bad": link.burst.p_good_to_bad,
            "p_bad_to_good": link.burst.p_bad_to_good,
            "loss_bad": link.burst.loss_bad,
        }
    return fields


def topology_toml(topology: Topology) -> str:
    """A topology file that parses back to `topology` (every address, access figure and
    both directions of every core link spelt out): how a variant made in memory
    (`with_core`) becomes the text a `Lab` and its emulator are built from."""
    lines = ["[lab]", f"seed = {topology.seed}", ""]
    for region in topology.regions.values():
        lines += [f"[regions.{region.name}]", f"description = {_toml_value(region.description)}"]
        lines.append("")
    for host in topology.hosts.values():
        lines += [
            f"[hosts.{host.name}]",
            f"region = {_toml_value(host.region)}",
            f"role = {_toml_value(host.role.value)}",
            f'address = "{host.address}"',
        ]
        if host.access is not None:
            up, down = host.access.uplink, host.access.downlink
            # a built-in profile keeps its name (every figure is still spelt out)
            named = host.access.profile in PROFILES
            access = {
                **({"profile": host.access.profile} if named else {}),
                "uplink_mbps": up.rate_mbps,
                "downlink_mbps": down.rate_mbps,
                "delay_ms": up.delay_ms,
                "jitter_ms": up.jitter_ms,
                "loss": up.loss,
                "queue_ms": up.queue_ms,
                "jitter_correlation_ms": up.jitter_correlation_ms,
            }
            lines.append(f"access = {_toml_value(access)}")
        lines.append("")
    for (a, b), link in topology.core.items():
        lines.append(f"[core.{a}.{b}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in _link_fields(link).items()]
        lines.append("")
    return "\n".join(lines)
