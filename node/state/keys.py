"""Every Redis key sfumesh uses, in one place.

Live state only; users, rooms and messages are in the document store.

| key | type | what |
|---|---|---|
| `sfumesh:{nodes}:node:<name>` | string (JSON), TTL | node record; expiry = node dead (N2) |
| `sfumesh:{nodes}:names` | set | names of registered nodes, so reapers find expired ones |
| `sfumesh:{nodes}:urls` | sorted set | node URL -> when last registered (s); CORS origins |
| `sfumesh:node-sessions:<name>` | set | session ids whose WebSocket is on that node |
| `sfumesh:node-inbox:<name>` | stream | messages for one node (session superseded, wake-ups) |
| `sfumesh:session:{<sid>}` | hash | user_id, node, region, connected_at, generation, room |
| `sfumesh:session-gen:{<sid>}` | counter, TTL | the session's last generation; outlives the hash |
| `sfumesh:{room:<slug>}:members` | hash | session id -> membership JSON, participant state |
| `sfumesh:{room:<slug>}:lock` | string | the room's distributed lock |
| `sfumesh:{room:<slug>}:fence` | counter | fencing tokens handed to lock holders (INCR) |
| `sfumesh:{room:<slug>}:fence-applied` | string | newest fence a guarded write applied |
| `sfumesh:{room:<slug>}:events` | stream | participant and chat events, in room order |
| `sfumesh:{room:<slug>}:removed:<uid>` | string, TTL | the creator removed this user: no join |
| `sfumesh:{room:<slug>}:seat-holds` | hash, TTL | session -> user, until: seat kept after a close |
| `sfumesh:{room:<slug>}:happening-lock:<id>` | string | serialises a happening's RSVPs |
| `sfumesh:{room:<slug>}:happening-fence:<id>` | counter | its fences: order of "going" answers |
| `sfumesh:{room:<slug>}:reminder-sent:<r>` | string, TTL | reminder r was published to the room |
| `sfumesh:{reminders}:due` | sorted set | reminder -> due time (ms), not yet claimed |
| `sfumesh:{reminders}:claimed` | sorted set | reminder -> claim lease expiry (ms) |
| `sfumesh:rooms-live` | set | slugs with members, for operators and reapers |
| `sfumesh:chat-limit:{<sid>}` | counter, TTL | chat messages in the current second |
| `sfumesh:loginlimit:{limits}:fail-acct:<h>` | counter, TTL | failed logins, one account (h) |
| `sfumesh:loginlimit:{limits}:fail-addr:<addr>` | counter, TTL | failed logins from one address |
| `sfumesh:loginlimit:{limits}:try-addr:<addr>` | counter, TTL | logins from one address |
| `sfumesh:loginlimit:{limits}:try-total` | counter, TTL | logins over the whole mesh |
| `sfumesh:signuplimit:{limits}:addr:<addr>` | counter, TTL | sign-ups from one address |
| `sfumesh:signuplimit:{limits}:total` | counter, TTL | sign-ups over the whole mesh |
| `sfumesh:room-lookups:<address>` | counter, TTL | room look-ups (info, QR) from one address |
| `sfumesh:room-creations:<uid>` | counter, TTL | rooms one user created in the window |
| `sfumesh:relays:<name>` | string (JSON), TTL | that node's relays and figures (mesh/relay.py) |
| `sfumesh:relay-msg:<id>` | string, TTL | a relay signalling message (the "redis" carrier) |
| `sfumesh:relay-seen:<name>:<id>` | string, TTL | a relay request id that node accepted (replays) |
| `sfumesh:token-revoked:<family>` | string, TTL | a logged-out login (node/state/revocation.py) |
| `sfumesh:ws-ticket:<sha256>` | string (JSON), TTL | a single-use WebSocket ticket, by its hash |
| `sfumesh:files:{files}:room:<slug>` | counter | bytes kept or being uploaded, one room |
| `sfumesh:files:{files}:user:<user id>` | counter | bytes kept or being uploaded, one user |

Every key of a room carries the hash tag `{room:<slug>}`, so in a Redis Cluster one room's
keys share a slot and one Lua script may touch them all. `fail-acct` counts the failed logins
of one account (or one unknown login name) from one address: h hashes both. `try-*` count
every login, right or wrong. The rate-limit counters share the
tag `{limits}` for the same reason: one attempt reserves a slot in several at once
(node/state/ratelimit.py). The file quota counters share `{files}`: an upload reserves its
bytes in its room's and its user's counter in one script (node/state/quota.py); they are
counted again from the store when missing. The room counters are also what operators read
for storage per room (`sfumesh cluster files`, the `sfumesh_file_*` gauges): found with
SCAN on `files_room_bytes_pattern()`, never by a label per room.

The same holds for the rest: node records, their name set and URL set share `{nodes}`
(registered and dropped in one transaction), the two reminder sets `{reminders}` (claimed by one
script), and a session's keys (record, generation, chat counter) its id. No script or
transaction touches two slots, so every one runs unchanged on a Redis Cluster; the global
sets (`rooms-live`, `node-sessions:*`) are changed by single commands only.
"""

from __future__ import annotations

PREFIX = "sfumesh"
NODES = f"{PREFIX}:{{nodes}}:names"
ROOMS_LIVE = f"{PREFIX}:rooms-live"


def node(name: str) -> str:
    return f"{PREFIX}:{{nodes}}:node:{name}"


def node_urls() -> str:
    """Every node URL registered lately, dead nodes' too: their pages fail over through the
    others, cross-origin (node/web/cors.py)."""
    return f"{PREFIX}:{{nodes}}:urls"


def node_sessions(name: str) -> str:
    return f"{PREFIX}:node-sessions:{name}"


def node_inbox(name: str) -> str:
    return f"{PREFIX}:node-inbox:{name}"


def session(session_id: str) -> str:
    return f"{PREFIX}:session:{{{session_id}}}"


def session_generation(session_id: str) -> str:
    """Kept apart from the session hash so that deleting the hash never restarts the count:
    a generation handed out twice would let an old connection's cleanup end a new one."""
    return f"{PREFIX}:session-gen:{{{session_id}}}"


def chat_limit(session_id: str) -> str:
    return f"{PREFIX}:chat-limit:{{{session_id}}}"


def room_lookups(address: str) -> str:
    """Counts GET /api/rooms/{slug} (and its QR code) per client address: room names must
    not be found by trying many."""
    return f"{PREFIX}:room-lookups:{address}"


def room_creations(user_id: str) -> str:
    return f"{PREFIX}:room-creations:{user_id}"


def _room(slug: str, part: str) -> str:
    return f"{PREFIX}:{{room:{slug}}}:{part}"


def room_members(slug: str) -> str:
    return _room(slug, "members")


def room_lock(slug: str) -> str:
    return _room(slug, "lock")


def room_fence(slug: str) -> str:
    return _room(slug, "fence")


def room_fence_applied(slug: str) -> str:
    return _room(slug, "fence-applied")


def room_events(slug: str) -> str:
    return _room(slug, "events")


def room_removed(slug: str, user_id: str) -> str:
    """Set when the room's creator removes a user; they cannot join again until it expires."""
    return _room(slug, f"removed:{user_id}")


def room_seat_holds(slug: str) -> str:
    """Seats kept for a while for sessions whose socket closed (a refresh, a failover):
    the same session (or user) gets its seat back, a stranger does not take it meanwhile.
    Each field says until when (ms); the hash's TTL drops it after the last hold."""
    return _room(slug, "seat-holds")


def node_reap_lock(name: str) -> str:
    """Held by the one node that reaps a failed node's sessions (Serf said it failed)."""
    return f"{PREFIX}:node-reap-lock:{name}"


def node_reap_fence(name: str) -> str:
    return f"{PREFIX}:node-reap-fence:{name}"


def node_relays(name: str) -> str:
    return f"{PREFIX}:relays:{name}"


def relay_message(message_id: str) -> str:
    return f"{PREFIX}:relay-msg:{message_id}"


def relay_seen(name: str, request_id: str) -> str:
    """Set (NX, with a TTL of twice the signing window) when node `name` accepts a relay
    request: the same id again within the window is a replay."""
    return f"{PREFIX}:relay-seen:{name}:{request_id}"


def token_revoked(family: str) -> str:
    """Set at logout: every token of that login (user, session, room) is refused until the
    longest of them has expired, then the key goes by itself."""
    return f"{PREFIX}:token-revoked:{family}"


def ws_ticket(ticket_hash: str) -> str:
    """By the ticket's hash, so a key listing shows no usable ticket."""
    return f"{PREFIX}:ws-ticket:{ticket_hash}"


_LIMITS = "{limits}"


def login_failures_of_account(account_address_hash: str) -> str:
    """Hashed (account, address): key listings show neither who nor from where."""
    return f"{PREFIX}:loginlimit:{_LIMITS}:fail-acct:{account_address_hash}"


def login_failures_from(address: str) -> str:
    return f"{PREFIX}:loginlimit:{_LIMITS}:fail-addr:{address}"


def login_attempts_from(address: str) -> str:
    return f"{PREFIX}:loginlimit:{_LIMITS}:try-addr:{address}"


def login_attempts_total() -> str:
    return f"{PREFIX}:loginlimit:{_LIMITS}:try-total"


def signups_from(address: str) -> str:
    return f"{PREFIX}:signuplimit:{_LIMITS}:addr:{address}"


def signups_total() -> str:
    return f"{PREFIX}:signuplimit:{_LIMITS}:total"


_FILES = "{files}"


def files_room_bytes(slug: str) -> str:
    return f"{PREFIX}:files:{_FILES}:room:{slug}"


def files_room_bytes_pattern() -> str:
    """SCAN pattern of every room's byte counter (`files_room_slug` reads a key back)."""
    return f"{PREFIX}:files:{_FILES}:room:*"


def files_room_slug(key: str) -> str:
    return key.removeprefix(f"{PREFIX}:files:{_FILES}:room:")


def files_user_bytes(user_id: str) -> str:
    return f"{PREFIX}:files:{_FILES}:user:{user_id}"


def happening_lock(slug: str, happening_id: str) -> str:
    """Held while one answer to the happening is written: answers queue for seats in the
    order of this lock's fences."""
    return _room(slug, f"happening-lock:{happening_id}")


def happening_fence(slug: str, happening_id: str) -> str:
    return _room(slug, f"happening-fence:{happening_id}")


def reminder_sent(slug: str, reminder: str) -> str:
    """Set in the same script that publishes the reminder to the room's stream: a second
    claimer of the same reminder finds it and publishes nothing."""
    return _room(slug, f"reminder-sent:{reminder}")


#: reminders waiting for their time (score: due, ms since the epoch, Redis clock)
REMINDERS_DUE = f"{PREFIX}:{{reminders}}:due"
#: reminders a node is writing (score: when its lease ends; then any node takes it over)
REMINDERS_CLAIMED = f"{PREFIX}:{{reminders}}:claimed"
