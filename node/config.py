"""Node configuration: a TOML file, then environment variables on top.

Every setting has a default that works for a local node. Secrets are `SecretStr` so that
printing or logging the config never shows them, and a setting that cannot be used is a
`ConfigError` naming the setting and the problem, never the value given for a secret (nor,
for pydantic's errors, any value: their messages quote the input).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mesh.process import is_loopback


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and why."""


#: the shortest relay key accepted (as `mesh.relay_signal.KEY_MIN_BYTES`: the base imports
#: nothing of the rest)
RELAY_KEY_MIN_BYTES = 32
#: the shortest TURN shared secret accepted (HMAC-SHA1 keys shorter than this are guessable)
TURN_SECRET_MIN_BYTES = 16


class TokenSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # kid -> secret. Verification accepts every key here; signing uses `signing_key_id`,
    # so a key is rotated by adding the new one, switching the id, and later dropping the old.
    keys: dict[str, SecretStr] = Field(default_factory=dict)
    signing_key_id: str = ""
    issuer: str = "sfumesh"
    audience: str = "sfumesh"
    # A user token lives an hour; a client renews it (POST /api/auth/refresh) before then,
    # for at most `user_max_age_s` after the login, when a new login is needed.
    user_ttl_s: int = Field(default=3600, gt=0)
    user_max_age_s: int = Field(default=7 * 24 * 3600, gt=0)
    session_ttl_s: int = Field(default=24 * 3600, gt=0)
    room_ttl_s: int = Field(default=5 * 60, gt=0)
    # The file token a page puts in <img src> URLs (an <img> cannot send a header): one
    # room's files, read only, short-lived (node/web/files.py).
    file_ttl_s: int = Field(default=10 * 60, gt=0)
    # A room's calendar feed URL (happenings); revoked by resetting it, so it may live long.
    calendar_ttl_s: int = Field(default=366 * 24 * 3600, gt=0)
    # A WebSocket ticket (POST /api/sessions/ws-ticket) is good once, for this long.
    ws_ticket_ttl_s: float = Field(default=30.0, gt=0, le=300)

    @model_validator(mode="after")
    def _signing_key_is_known(self) -> TokenSettings:
        if self.keys and self.signing_key_id not in self.keys:
            raise ValueError(f"tokens.signing_key_id {self.signing_key_id!r} is not in tokens.keys")
        for kid, secret in self.keys.items():
            if len(secret.get_secret_value().encode()) < 32:
                raise ValueError(f"tokens.keys[{kid!r}] must be at least 32 bytes")
        return self


class LoginLimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Failed logins allowed per window: per account from one client address (so a stranger
    # elsewhere cannot lock the owner out; an unknown login counts as its own account), and
    # per client address over all accounts.
    per_login: int = Field(default=5, gt=0)
    per_address: int = Field(default=20, gt=0)
    window_s: float = Field(default=300.0, gt=0)
    # Every login that reaches bcrypt, right or wrong, per client address and over the whole
    # mesh, per `attempts_window_s`: one bcrypt check costs ~0.25 s of a core at cost 12.
    attempts_per_address: int = Field(default=60, gt=0)
    attempts_total: int = Field(default=1200, gt=0)
    attempts_window_s: float = Field(default=60.0, gt=0)


class SignupLimitSettings(BaseModel):
    """Sign-ups (each costs one bcrypt hash) per client address and over the whole mesh."""

    model_config = ConfigDict(extra="forbid")

    per_address: int = Field(default=10, gt=0)
    per_address_window_s: float = Field(default=3600.0, gt=0)
    total: int = Field(default=120, gt=0)
    total_window_s: float = Field(default=60.0, gt=0)


class HashingSettings(BaseModel):
    """bcrypt runs in a pool of its own, so hashing floods queue there and never take the
    threads the rest of the node uses; past `max_waiting` a request is told `busy` (503)."""

    model_config = ConfigDict(extra="forbid")

    # Half the CPUs (at least one): the rest stay for the event loop and media forwarding.
    threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), gt=0, le=64)
    max_waiting: int = Field(default=32, ge=0)


class RoomSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    create_policy: Literal["anyone", "allowlist"] = "anyone"
    # Usernames allowed to create rooms when create_policy is "allowlist".
    creators: list[str] = Field(default_factory=list)
    default_capacity: int = Field(default=8, gt=0)
    max_capacity: int = Field(default=100, gt=0)
    # Someone the room's creator removes cannot join it again for this long.
    removed_for_s: float = Field(default=600.0, gt=0)
    # GET /api/rooms/{slug} and its QR code, per client address per window: rooms are not
    # found by trying names (the web client's name check while typing is one per pause).
    lookups_per_window: int = Field(default=120, gt=0)
    lookup_window_s: float = Field(default=60.0, gt=0)
    # Rooms one user may create per window (429 after).
    creations_per_window: int = Field(default=20, gt=0)
    creation_window_s: float = Field(default=24 * 3600.0, gt=0)
    # A room's live state in Redis (its events, fence, ...) is kept this long after its last
    # person left, then expires; anyone joining before that keeps it.
    empty_ttl_s: float = Field(default=24 * 3600.0, gt=0)


class FileSettings(BaseModel):
    """Memories (issue 15): files and photos kept in a room (node/store/files.py)."""

    model_config = ConfigDict(extra="forbid")

    #: one upload's bytes at most; more is refused with 413 and nothing is kept
    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    #: all files of one room together, and all of one user's uploads (over every room)
    room_quota_bytes: int = Field(default=2 * 1024 * 1024 * 1024, gt=0)
    user_quota_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    #: whether a room's creator may opt the room in to keeping photos' originals as
    #: uploaded, EXIF (location, camera serial...) included (`PATCH /api/rooms/{slug}`
    #: `{"keep_original_exif": true}`); false: every variant of every photo is re-encoded
    #: without it, whatever rooms chose. Each room strips by default.
    keep_original_exif_allowed: bool = True
    #: a node's temporary upload files (`data_dir/uploads`, named after the node) older than
    #: this are removed when it starts: left by a node killed mid-upload
    stale_upload_s: float = Field(default=15 * 60.0, gt=0)
    #: decoded pixels of one image at most (Pillow's decompression-bomb limit)
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    thumb_px: int = Field(default=320, ge=16, le=2048)
    display_px: int = Field(default=1600, ge=64, le=8192)
    #: images decoded at once on this node (each may take max_image_pixels * 4 bytes)
    image_workers: int = Field(default=2, ge=1, le=32)
    max_page: int = Field(default=100, ge=1, le=1000)


class LiveSettings(BaseModel):
    """Sessions, rooms and the node registry in Redis (the Sessions issue)."""

    model_config = ConfigDict(extra="forbid")

    # A node record lives this long without a refresh; after that the node counts as dead
    # and its sessions are reaped by the others.
    node_ttl_s: float = Field(default=10.0, gt=0)
    reaper_period_s: float = Field(default=3.0, gt=0)
    # A node's URL stays a mesh origin for CORS this long after it was last registered:
    # the pages it served fail over to the other nodes cross-origin once it is dead (its
    # record expired or reaped) or drained, and keep calling them for the rest of the call.
    node_url_memory_s: float = Field(default=24 * 3600.0, gt=0)
    # No frame (not even `ping`) from a client for this long ends its session.
    ws_idle_timeout_s: float = Field(default=45.0, gt=0)
    # The largest WebSocket message a client may send; the server (Hypercorn) closes the
    # socket of one that exceeds it (1009) before buffering more.
    ws_max_frame_bytes: int = Field(default=64 * 1024, gt=0)
    # Sessions with an open WebSocket on this node, per user and per client address; one
    # more is refused at the handshake (429 too_many_connections).
    ws_max_per_user: int = Field(default=10, gt=0)
    ws_max_per_address: int = Field(default=50, gt=0)
    # A client's `answer` to the node's subscribe offer grows with the room's tracks: it may
    # be up to twice the offer plus a margin (see `MediaSession.answer_limit`), never more
    # than this. The server's own frame limit must allow `max_incoming_frame_bytes`.
    ws_max_answer_bytes: int = Field(default=1024 * 1024, gt=0)
    # Frames per second a client may send before it is told to slow down.
    ws_frames_per_s: int = Field(default=50, gt=0)
    chat_per_s: int = Field(default=5, gt=0)
    # A user joining a room they are already in: replace the old session, reject, or allow.
    duplicate_policy: Literal["replace", "reject", "allow"] = "replace"
    # An HTTP join holds a seat this long, unless its WebSocket `join` completes; joining
    # again on the same connection does not renew it (seats cannot be squatted unseen).
    pending_seat_ttl_s: float = Field(default=15.0, gt=0)
    # A member whose socket closed without leaving (a refresh, its node died) keeps the
    # seat this long for the same session or user: a stranger joining meanwhile does not
    # take it. 0: freed at once.
    seat_grace_s: float = Field(default=10.0, ge=0, le=120)
    lock_ttl_s: float = Field(default=5.0, gt=0)
    # How long a request waits for a busy room lock before it is told to try again (503).
    lock_wait_s: float = Field(default=10.0, gt=0)
    # Extra independent Redis servers for the lock quorum (the state Redis is always one).
    lock_redis_urls: list[SecretStr] = Field(default_factory=list)

    @property
    def max_incoming_frame_bytes(self) -> int:
        """The largest frame a client may send at all (an answer to a large offer)."""
        return max(self.ws_max_frame_bytes, self.ws_max_answer_bytes)


class MediaSettings(BaseModel):
    """WebRTC media (the Media core issue). Empty lists mean: nothing configured, nothing
    contacted (no public STUN server unless listed in `ice_servers`)."""

    model_config = ConfigDict(extra="forbid")

    # Addresses ICE host candidates are gathered on; [] = aioice's own discovery (every
    # interface except 127.0.0.1). ["127.0.0.1"] for loopback tests and demos.
    host_addresses: list[str] = Field(default_factory=list)
    # STUN/TURN server URLs (e.g. "stun:stun.example.org:3478").
    ice_servers: list[str] = Field(default_factory=list)
    # Addresses announced to clients instead of the host addresses (same ports), e.g. the
    # public address of a node behind 1:1 NAT; [] = announce the host candidates as they are.
    announced_addresses: list[str] = Field(default_factory=list)
    # At most one keyframe request toward a publisher's track per this many seconds.
    keyframe_interval_s: float = Field(default=0.5, gt=0)
    # While a subscriber (or a relay) waits for a keyframe, a request not answered within
    # this many seconds is sent again (a PLI or the keyframe itself lost on some hop); the
    # wait is given up (logged, counted) after keyframe_give_up_s. Each relay hop retries.
    keyframe_retry_s: float = Field(default=0.6, gt=0)
    keyframe_give_up_s: float = Field(default=10.0, gt=0)
    # Simulcast: the highest layer (0 = the publisher's lowest encoding) any subscriber is
    # sent, whatever its bandwidth and tile allow: the operator's cap (issue 14).
    simulcast_max_layer: int = Field(default=2, ge=0, le=2)
    # Whether a subscriber's layer follows its bandwidth estimate (REMB) and reported loss;
    # off, only its tiles and the cap choose (a LAN, or a host too loaded for delay-based
    # estimates to mean anything).
    simulcast_follow_bandwidth: bool = True
    # What each simulcast layer (lowest first) may take at most, bits/s: the web client's
    # encodings' caps (`SIMULCAST_ENCODINGS` in webapp/media.js). REMB to a simulcast
    # publisher asks for the layers subscribers select, each at least this (a layer that is
    # off, or still ramping up, has no measured rate to go by).
    simulcast_layer_bitrates: list[PositiveInt] = Field(
        default_factory=lambda: [150_000, 500_000, 1_500_000], min_length=1, max_length=3
    )
    # A layer no subscriber (nor relay) has selected for this long is switched off at the
    # publisher (`layers` message); one wanted again is switched on at once. The delay keeps
    # a tile being resized from flapping the encodings.
    simulcast_layer_off_s: float = Field(default=3.0, ge=0)
    # Budget per published track (bits/s of RTP payload, with one second of burst). Packets
    # above it are dropped and counted; REMB toward the publisher never asks for more.
    max_video_bitrate: int = Field(default=8_000_000, gt=0)
    max_audio_bitrate: int = Field(default=512_000, gt=0)
    # Every m-line of a publish offer becomes a track in every subscriber's connection (and
    # its SDP, and /metrics series), so they are capped: m-lines in one publish offer (every
    # offer holds all the connection's m-lines: audio, video, screen share and one spare),
    # tracks one user publishes in a room on this node (all their sessions), and tracks in
    # one room on this node (local and relayed; 50 people with audio, video and a few
    # screen shares). An offer over a cap is refused whole (`too_many_tracks`).
    max_tracks_per_offer: int = Field(default=4, gt=0)
    max_tracks_per_participant: int = Field(default=8, gt=0)
    max_tracks_per_room: int = Field(default=150, gt=0)
    # Tracks started on one publish connection, restarts included: a subscriber's
    # connection gains an m-line per track ever sent on it (aiortc never reuses one), so a
    # publisher toggling tracks on and off must not grow everyone's SDP without end.
    # (The web client mutes by disabling tracks, which starts nothing.)
    max_track_starts_per_connection: int = Field(default=32, gt=0)
    # ICE candidates a client gives (WebSocket `candidate` messages and a=candidate lines of
    # its SDP) make the node send connectivity checks to them: at most this many distinct
    # ones per peer connection, and only addresses a client could own. Unspecified,
    # multicast, link-local and reserved addresses are always refused; loopback, private
    # and other non-global ones (the node's own networks) and mDNS names only when this is
    # on: local demos and tests on one machine (the local launcher turns it on).
    max_candidates_per_connection: int = Field(default=32, gt=0)
    allow_private_candidates: bool = False

    @field_validator("host_addresses", "announced_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            ipaddress.ip_address(address)
        return value


class TurnSettings(BaseModel):
    """TURN for clients behind strict NATs and firewalls (issue 18 item 1): a coturn with
    `use-auth-secret` and the same `secret`. Each connected session is handed credentials of
    its own in the TURN REST style coturn checks (username `expiry:session_id`, password
    base64(HMAC-SHA1(secret, username))), so no long-lived TURN password reaches a client
    and a leaked one dies with its expiry. The node itself never uses TURN (it has a public
    address; a client's relay candidate reaches it directly)."""

    model_config = ConfigDict(extra="forbid")

    # "turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:443?transport=tcp"
    # ...; [] = no TURN (nothing handed out).
    urls: list[str] = Field(default_factory=list)
    # coturn's `static-auth-secret` (SFUMESH_TURN_SECRET); required with `urls`.
    secret: SecretStr = SecretStr("")
    # How long a credential is good for new allocations: a leaked one opens nothing after
    # that. coturn checks the expiry when a client allocates; an allocation made in time
    # was still refreshed after it (coturn 4.6.1), so calls in progress keep their relay.
    # A peer connection a client creates later than this after its WebSocket's `hello`
    # gets no relay; every reconnect brings fresh credentials.
    credential_ttl_s: int = Field(default=12 * 3600, ge=60, le=7 * 24 * 3600)

    @field_validator("urls")
    @classmethod
    def _turn_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            scheme, sep, rest = url.partition(":")
            if (
                scheme not in ("turn", "turns")
                or not sep
                or not rest
                or any(c.isspace() for c in url)
            ):
                raise ValueError("turn.urls: each must be a turn: or turns: URL (RFC 7065)")
        return value

    @model_validator(mode="after")
    def _secret_with_urls(self) -> TurnSettings:
        if self.urls and len(self.secret.get_secret_value().encode()) < TURN_SECRET_MIN_BYTES:
            raise ValueError(
                f"turn.secret (SFUMESH_TURN_SECRET) is required with turn.urls: coturn's "
                f"static-auth-secret, at least {TURN_SECRET_MIN_BYTES} bytes"
            )
        return self


class SerfSettings(BaseModel):
    """The node's Serf agent (the Mesh issue): its own child agent, or an operator's."""

    model_config = ConfigDict(extra="forbid")

    # "own": start `serf agent` beside the node; "attach": use the agent at rpc_addr;
    # "off": no mesh (a single node; placement falls back to the Redis registry).
    mode: Literal["own", "attach", "off"] = "own"
    bind: str = "0.0.0.0:7946"
    # The address other agents reach this one on ("" = Serf picks it from bind).
    advertise: str = ""
    rpc_addr: str = "127.0.0.1:7373"
    rpc_auth: SecretStr = SecretStr("")
    # Gossip encryption key (`serf keygen`); required in "own" mode.
    encrypt_key: SecretStr = SecretStr("")
    # Agents to join at start (host:port of their bind addresses).
    join: list[str] = Field(default_factory=list)
    # "" = <data_dir>/serf/<node_name>.snapshot
    snapshot_path: str = ""
    # How often the node's load tag may change, and the membership view is resynced.
    load_tag_period_s: float = Field(default=10.0, gt=0)
    resync_period_s: float = Field(default=30.0, gt=0)


class RelaySettings(BaseModel):
    """Media relays between nodes (the Relay issue); on whenever the mesh is."""

    model_config = ConfigDict(extra="forbid")

    # How long an idle relay (no track either way) stays open before it closes.
    linger_s: float = Field(default=10.0, ge=0)
    # How offers and answers travel: "inline" in the Serf query itself (ORTC-style, under
    # 1 KB), or "redis": the message in a short-lived Redis key, the query carrying its name.
    carrier: Literal["inline", "redis"] = "inline"
    # One signalling attempt waits this long for the answer, plus twice the peer's
    # estimated RTT (Serf's coordinates), then it is sent again.
    attempt_timeout_s: float = Field(default=1.0, gt=0)
    attempts: int = Field(default=6, gt=0)
    # A relay link's ICE checks and DTLS handshake flights are sent again after this long
    # without an answer (doubling), scaled up to 3x the Vivaldi RTT estimate of far peers
    # (at most 1 s). 0: aioice's and OpenSSL's own timers (0.5 s and 1 s), which made a
    # single lost packet cost 0.5-1 s of setup on a 35 ms path.
    setup_rto_s: float = Field(default=0.15, ge=0, le=1.0)
    # How often each node writes its relays' figures for `sfumesh cluster relays`.
    report_period_s: float = Field(default=2.0, gt=0)
    # The cluster's relay key, the same on every node (`sfumesh keygen`): every relay
    # signalling message carries an HMAC with it. Required whenever the mesh is on.
    key: SecretStr = SecretStr("")
    # A relay message sealed longer ago (or further ahead: clocks differ) than this is
    # refused; each node remembers the request ids it accepted for twice as long.
    signal_window_s: float = Field(default=30.0, gt=0, le=600)


class MetricsSettings(BaseModel):
    """What /metrics shows, and where (issue 21 item 13)."""

    model_config = ConfigDict(extra="forbid")

    # Media series per track, labelled with session ids (debugging, benches). Off: summed
    # per direction and kind, a fixed handful of series that name no session.
    per_session: bool = False
    # "host:port" of a listener of its own for /metrics (e.g. "127.0.0.1:9464", reachable
    # by the scraper only); then the public listener answers 404 there. "" = the public one.
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not value:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError("metrics.listen must be host:port, e.g. 127.0.0.1:9464")
        return value


class HappeningSettings(BaseModel):
    """Happenings in rooms (R8, issue 16): reminders, limits."""

    model_config = ConfigDict(extra="forbid")

    # The room is reminded this long before a happening starts (and again at its start).
    reminder_lead_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # How often each node looks for due reminders; the delivery delay is about this long.
    reminder_poll_s: float = Field(default=0.25, gt=0, le=10)
    # A claimed reminder not written within this time is taken over by another node.
    reminder_lease_s: float = Field(default=10.0, gt=0, le=300)
    # A reminder due longer ago than this (every node was down) is dropped, not sent late.
    reminder_max_late_s: float = Field(default=3600.0, gt=0)
    # How often each node checks the store for reminders Redis lost (and at start).
    reminder_reconcile_s: float = Field(default=300.0, gt=0)
    # Happenings one room may hold (past ones included) and people one may seat.
    max_per_room: int = Field(default=500, gt=0)
    max_capacity: int = Field(default=10_000, gt=0)


class RedisSettings(BaseModel):
    """Which Redis deployment holds the live state. `single` (the default): `redis_url`.
    `sentinel`: the primary that Redis Sentinel names for `sentinel_service`, asked of
    `sentinels`, followed through failovers. `cluster`: a Redis Cluster, `redis_url` naming
    any one of its nodes (the others are discovered)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["single", "sentinel", "cluster"] = "single"
    # "host:port" of each sentinel (three or more, on separate machines, for a real quorum)
    sentinels: list[str] = Field(default_factory=list)
    sentinel_service: str = "sfumesh"
    # the sentinels' own password (their `requirepass`), if any
    sentinel_password: SecretStr = SecretStr("")
    # the primary's and replicas' password (sentinel mode; in the other modes: in redis_url)
    password: SecretStr = SecretStr("")
    # Sentinel mode: replicas that must hold a lock's fencing token (WAIT, up to
    # wait_timeout_ms) before the lock counts as taken: a failover then never hands the same
    # fence out twice. With one replica down and wait_replicas of them needed, room changes
    # wait (and answer 503 after live.lock_wait_s): run two replicas for wait_replicas = 1.
    wait_replicas: int = Field(default=1, ge=0)
    wait_timeout_ms: int = Field(default=500, gt=0)

    @field_validator("sentinels")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _sentinels_given(self) -> RedisSettings:
        if self.mode == "sentinel" and not self.sentinels:
            raise ValueError("redis.mode 'sentinel' needs redis.sentinels (host:port, ...)")
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        pairs = [item.rpartition(":") for item in self.sentinels]
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = "node-1"
    region: str = "local"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_base_url: str = ""
    # Empty means: start an embedded server (redis-server / nx-27017) under data_dir.
    redis_url: SecretStr = SecretStr("")
    mongodb_uri: SecretStr = SecretStr("")
    redis: RedisSettings = Field(default_factory=RedisSettings)
    database: str = "sfumesh"
    data_dir: Path = Path(".data")
    bcrypt_cost: int = Field(default=12, ge=4, le=31)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    log_level: str = "INFO"
    # Once started, move the node's start-up objects out of the cyclic garbage collector's
    # walks (gc.freeze): shorter full collections, the event loop's longest pauses
    # (node/runtime/gc_pauses.py). Off only to compare.
    gc_freeze: bool = True
    # Addresses of reverse proxies whose X-Forwarded-For is believed (for per-address login
    # limits); requests from anywhere else are taken at their socket address.
    trusted_proxies: list[str] = Field(default_factory=list)
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    login_limit: LoginLimitSettings = Field(default_factory=LoginLimitSettings)
    signup_limit: SignupLimitSettings = Field(default_factory=SignupLimitSettings)
    hashing: HashingSettings = Field(default_factory=HashingSettings)
    rooms: RoomSettings = Field(default_factory=RoomSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    turn: TurnSettings = Field(default_factory=TurnSettings)
    serf: SerfSettings = Field(default_factory=SerfSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    files: FileSettings = Field(default_factory=FileSettings)
    happenings: HappeningSettings = Field(default_factory=HappeningSettings)

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def base_url(self) -> str:
        return self.public_base_url or f"http://{self.host}:{self.port}"

    def check_mesh(self) -> None:
        """ConfigError if the mesh is on without what it needs to run safely. Checked when a
        node starts, not when settings load (tools read settings without running a mesh),
        and here rather than in a validator, whose error would echo the secrets beside."""
        serf = self.serf
        if serf.mode == "off":
            return
        # Serf's RPC sends queries as any node, lists members and makes the agent leave:
        # anyone who can reach it from another machine must prove they may.
        if not is_loopback(serf.rpc_addr) and not serf.rpc_auth.get_secret_value():
            raise ConfigError(
                f"serf.rpc_auth (SFUMESH_SERF_RPC_AUTH) is required when serf.rpc_addr "
                f"({serf.rpc_addr}) is not a loopback address"
            )
        if len(self.relay.key.get_secret_value().encode()) < RELAY_KEY_MIN_BYTES:
            raise ConfigError(
                "relay.key (SFUMESH_RELAY_KEY) is required with the mesh on: the same secret "
                f"on every node, at least {RELAY_KEY_MIN_BYTES} bytes; `sfumesh keygen` "
                "prints one"
            )


# Environment variable -> dotted setting. Values are parsed as JSON when they look like it
# (numbers, lists, objects), otherwise taken as strings.
ENV_VARS: dict[str, str] = {
    "SFUMESH_NODE_NAME": "node_name",
    "SFUMESH_REGION": "region",
    "SFUMESH_HOST": "host",
    "SFUMESH_PORT": "port",
    "SFUMESH_PUBLIC_BASE_URL": "public_base_url",
    "REDIS_URL": "redis_url",
    "MONGODB_URI": "mongodb_uri",
    "SFUMESH_REDIS_MODE": "redis.mode",
    "SFUMESH_REDIS_SENTINELS": "redis.sentinels",
    "SFUMESH_REDIS_SENTINEL_SERVICE": "redis.sentinel_service",
    "SFUMESH_REDIS_SENTINEL_PASSWORD": "redis.sentinel_password",
    "SFUMESH_REDIS_PASSWORD": "redis.password",
    "SFUMESH_REDIS_WAIT_REPLICAS": "redis.wait_replicas",
    "SFUMESH_DATABASE": "database",
    "SFUMESH_DATA_DIR": "data_dir",
    "SFUMESH_BCRYPT_COST": "bcrypt_cost",
    "SFUMESH_MAX_BODY_BYTES": "max_body_bytes",
    "SFUMESH_LOG_LEVEL": "log_level",
    "SFUMESH_GC_FREEZE": "gc_freeze",
    "SFUMESH_TRUSTED_PROXIES": "trusted_proxies",
    "SFUMESH_TOKEN_KEYS": "tokens.keys",
    "SFUMESH_TOKEN_SIGNING_KEY_ID": "tokens.signing_key_id",
    "SFUMESH_USER_TOKEN_TTL_S": "tokens.user_ttl_s",
    "SFUMESH_USER_TOKEN_MAX_AGE_S": "tokens.user_max_age_s",
    "SFUMESH_LOGIN_LIMIT_PER_LOGIN": "login_limit.per_login",
    "SFUMESH_LOGIN_LIMIT_PER_ADDRESS": "login_limit.per_address",
    "SFUMESH_LOGIN_LIMIT_WINDOW_S": "login_limit.window_s",
    "SFUMESH_LOGIN_ATTEMPTS_PER_ADDRESS": "login_limit.attempts_per_address",
    "SFUMESH_LOGIN_ATTEMPTS_TOTAL": "login_limit.attempts_total",
    "SFUMESH_LOGIN_ATTEMPTS_WINDOW_S": "login_limit.attempts_window_s",
    "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS": "signup_limit.per_address",
    "SFUMESH_SIGNUP_LIMIT_PER_ADDRESS_WINDOW_S": "signup_limit.per_address_window_s",
    "SFUMESH_SIGNUP_LIMIT_TOTAL": "signup_limit.total",
    "SFUMESH_SIGNUP_LIMIT_TOTAL_WINDOW_S": "signup_limit.total_window_s",
    "SFUMESH_HASHING_THREADS": "hashing.threads",
    "SFUMESH_HASHING_MAX_WAITING": "hashing.max_waiting",
    "SFUMESH_ROOM_CREATE_POLICY": "rooms.create_policy",
    "SFUMESH_ROOM_CREATORS": "rooms.creators",
    "SFUMESH_ROOM_MAX_CAPACITY": "rooms.max_capacity",
    "SFUMESH_ROOM_LOOKUPS_PER_WINDOW": "rooms.lookups_per_window",
    "SFUMESH_ROOM_CREATIONS_PER_WINDOW": "rooms.creations_per_window",
    "SFUMESH_NODE_TTL_S": "live.node_ttl_s",
    "SFUMESH_REAPER_PERIOD_S": "live.reaper_period_s",
    "SFUMESH_NODE_URL_MEMORY_S": "live.node_url_memory_s",
    "SFUMESH_WS_IDLE_TIMEOUT_S": "live.ws_idle_timeout_s",
    "SFUMESH_WS_MAX_FRAME_BYTES": "live.ws_max_frame_bytes",
    "SFUMESH_WS_MAX_ANSWER_BYTES": "live.ws_max_answer_bytes",
    "SFUMESH_WS_MAX_PER_USER": "live.ws_max_per_user",
    "SFUMESH_WS_MAX_PER_ADDRESS": "live.ws_max_per_address",
    "SFUMESH_DUPLICATE_POLICY": "live.duplicate_policy",
    "SFUMESH_CHAT_PER_S": "live.chat_per_s",
    "SFUMESH_PENDING_SEAT_TTL_S": "live.pending_seat_ttl_s",
    "SFUMESH_REMINDER_LEAD_S": "happenings.reminder_lead_s",
    "SFUMESH_REMINDER_POLL_S": "happenings.reminder_poll_s",
    "SFUMESH_REMINDER_LEASE_S": "happenings.reminder_lease_s",
    "SFUMESH_LOCK_REDIS_URLS": "live.lock_redis_urls",
    "SFUMESH_MEDIA_HOST_ADDRESSES": "media.host_addresses",
    "SFUMESH_MEDIA_SIMULCAST_MAX_LAYER": "media.simulcast_max_layer",
    "SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH": "media.simulcast_follow_bandwidth",
    "SFUMESH_MEDIA_SIMULCAST_LAYER_OFF_S": "media.simulcast_layer_off_s",
    "SFUMESH_ICE_SERVERS": "media.ice_servers",
    "SFUMESH_MEDIA_ANNOUNCED_ADDRESSES": "media.announced_addresses",
    "SFUMESH_MEDIA_MAX_TRACKS_PER_OFFER": "media.max_tracks_per_offer",
    "SFUMESH_MEDIA_MAX_TRACKS_PER_PARTICIPANT": "media.max_tracks_per_participant",
    "SFUMESH_MEDIA_MAX_TRACKS_PER_ROOM": "media.max_tracks_per_room",
    "SFUMESH_MEDIA_ALLOW_PRIVATE_CANDIDATES": "media.allow_private_candidates",
    "SFUMESH_TURN_URLS": "turn.urls",
    "SFUMESH_TURN_SECRET": "turn.secret",
    "SFUMESH_TURN_CREDENTIAL_TTL_S": "turn.credential_ttl_s",
    "SFUMESH_SERF_MODE": "serf.mode",
    "SFUMESH_SERF_BIND": "serf.bind",
    "SFUMESH_SERF_ADVERTISE": "serf.advertise",
    "SFUMESH_SERF_RPC_ADDR": "serf.rpc_addr",
    "SFUMESH_SERF_RPC_AUTH": "serf.rpc_auth",
    "SFUMESH_SERF_ENCRYPT_KEY": "serf.encrypt_key",
    "SFUMESH_SERF_JOIN": "serf.join",
    "SFUMESH_SERF_SNAPSHOT_PATH": "serf.snapshot_path",
    "SFUMESH_SERF_LOAD_TAG_PERIOD_S": "serf.load_tag_period_s",
    "SFUMESH_RELAY_LINGER_S": "relay.linger_s",
    "SFUMESH_RELAY_CARRIER": "relay.carrier",
    "SFUMESH_RELAY_ATTEMPT_TIMEOUT_S": "relay.attempt_timeout_s",
    "SFUMESH_RELAY_REPORT_PERIOD_S": "relay.report_period_s",
    "SFUMESH_RELAY_KEY": "relay.key",
    "SFUMESH_RELAY_SIGNAL_WINDOW_S": "relay.signal_window_s",
    "SFUMESH_METRICS_PER_SESSION": "metrics.per_session",
    "SFUMESH_METRICS_LISTEN": "metrics.listen",
    "SFUMESH_MAX_FILE_BYTES": "files.max_file_bytes",
    "SFUMESH_ROOM_QUOTA_BYTES": "files.room_quota_bytes",
    "SFUMESH_USER_QUOTA_BYTES": "files.user_quota_bytes",
    "SFUMESH_KEEP_ORIGINAL_EXIF_ALLOWED": "files.keep_original_exif_allowed",
}


def _parse_env_value(raw: str) -> Any:
    if raw[:1] in "[{" or raw.lstrip("-").isdigit():
        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            # Where, not what: the value may be a secret (SFUMESH_TOKEN_KEYS).
            raise ConfigError(f"not valid JSON: {error.msg} at character {error.pos}") from None
    return raw


def _holds_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_holds_secret(arg) for arg in get_args(annotation))


def _is_secret(model: type[BaseModel], loc: tuple[int | str, ...]) -> bool:
    """Whether the setting at `loc` (a pydantic error location) is a secret or inside one."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return False
        if _holds_secret(field.annotation):
            return True
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return False
        model = field.annotation
    return False


# Pydantic's own messages say what was expected, never what was given; those of validators
# (ours, or a library's) may quote the value, so for a secret they are not repeated.
_OWN_MESSAGES = ("value_error", "assertion_error")


def _describe(error: ValidationError) -> str:
    """Each problem as `setting: what is wrong`, without the values given."""
    problems = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        what = item["msg"]
        if _is_secret(Settings, item["loc"]) and item["type"] in _OWN_MESSAGES:
            what = "not a usable value (a secret: not shown)"
        problems.append(f"{where}: {what}")
    return "; ".join(problems)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def load_settings(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """File, then environment, then explicit overrides (dotted keys), validated once."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config file {path}: {error}") from error
    environ = os.environ if env is None else env
    for name, dotted in ENV_VARS.items():
        if environ.get(name):
            try:
                _set_dotted(data, dotted, _parse_env_value(environ[name]))
            except ConfigError as error:
                raise ConfigError(f"{name}: {error}") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        # `from None`: the ValidationError, with every input in it, must not ride along to a
        # traceback in a log.
        raise ConfigError(_describe(error)) from None


def new_key() -> str:
    """A fresh token signing secret (for demos, tests and `sfumesh keygen`); here, beside the
    settings that hold the keys, so launchers need nothing of the web layer."""
    return secrets.token_urlsafe(48)
