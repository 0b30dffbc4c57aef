"""Happenings in the live room (R8): announcements, race-free answers, and the reminder loop.

Planning, changing and cancelling a happening is told to the room twice: a chat line from
"sfumesh" (stored, so the history shows it) and a `happening` event with the whole view, so
every open page on every node redraws it. An answer (RSVP) is told the same way, but only
when it changes something: the same answer given again writes nothing and says nothing, so
the chat gets one line per real change of answer ("Bob is going", "Bob can't come"), never
one per click.

The room's limit on happenings (`happenings.max_per_room`) is a count then an insert; `plan`
does both under the room's distributed lock, so creations racing for the last places never
overshoot it.

Answers to one happening are written one at a time under its lock (node/state/lock.py), and
the lock's fence becomes the answer's place in the queue for seats (node/store/happenings.py
derives who goes and who waits from the answers alone). The response is read once the answer
is written, so it says truly whether this answer got a seat.

Every node runs `ReminderLoop`; node/state/reminders.py says how a reminder is sent exactly
once whichever nodes are up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import DuplicateKeyError
from redis.exceptions import RedisError

from node.errors import NotFound
from node.runtime.live import Live
from node.state import keys
from node.state.reminders import Reminders
from node.store.happenings import (
    Answer,
    Happening,
    HappeningView,
    NewHappening,
    ReminderKind,
    coming_happenings,
    create_happening,
    epoch_ms,
    get_happening,
    happening_view,
    record_answer,
    reminder_id,
    reminder_message_id,
    reminder_text,
)
from node.store.models import Message, Room

log = logging.getLogger(__name__)

SYSTEM_NAME = "sfumesh"


def _iso(value: datetime) -> str:
    return (value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def chat_event(message: Message, **extra: Any) -> dict[str, Any]:
    """A system message as the room's `chat` event (the shape node/runtime/chat.py sends)."""
    return {
        "id": str(message.id),
        "from": {"session_id": "", "user_id": "", "display_name": SYSTEM_NAME},
        "text": message.text,
        "ts": _iso(message.ts),
        **extra,
    }


async def publish_view(live: Live, action: str, view: HappeningView) -> None:
    await live.events.publish(
        view.room, "happening", {"action": action, "happening": view.model_dump(mode="json")}
    )


async def announce(
    live: Live, room: Room, action: str, happening: Happening, by_name: str
) -> HappeningView:
    """Tell the room: a chat line and the `happening` event; the view sent."""
    verb = {"created": "planned", "updated": "changed", "cancelled": "cancelled"}[action]
    view = await happening_view(happening)
    when = datetime.fromisoformat(view.start_local).strftime("%Y-%m-%d %H:%M")
    text = f"📅 {by_name} {verb} “{happening.title}”: {when} ({happening.zone})"
    await say(live, room, text, view)
    await publish_view(live, action, view)
    return view


async def say(live: Live, room: Room, text: str, view: HappeningView) -> None:
    """A stored chat line from "sfumesh" about `view`, sent to the room's open pages."""
    message = Message(room=room.slug, author_id="", author_name=SYSTEM_NAME, text=text)
    await message.insert()
    await live.events.publish(room.slug, "chat", chat_event(message, happening=view.id))


def answer_text(view: HappeningView, user_id: str, display_name: str) -> str:
    """The chat line of one person's changed answer, with where it left them."""
    mine = next((r for r in view.rsvps if r.user_id == user_id), None)
    title = f"“{view.title}”"
    if mine is None or mine.status == "not_going":
        return f"🙅 {display_name} can't come to {title}"
    if mine.status == "going":
        return f"🙋 {display_name} is going to {title}"
    if mine.status == "waitlisted":
        return f"⏳ {display_name} is on the wait list for {title} (#{mine.position})"
    return f"🤔 {display_name} might come to {title}"


async def plan(
    live: Live,
    room: Room,
    user_id: str,
    user_name: str,
    new: NewHappening,
    max_per_room: int,
    max_capacity: int,
) -> Happening:
    """Create a happening; the room's limit is counted and taken under the room's lock."""
    async with live.lock.hold(keys.room_lock(room.slug), keys.room_fence(room.slug)):
        return await create_happening(room, user_id, user_name, new, max_per_room, max_capacity)


async def answer(
    live: Live, room: Room, happening: Happening, user_id: str, display_name: str, value: Answer
) -> HappeningView:
    """Record `user_id`'s answer under the happening's lock and tell the room."""
    happening_id = str(happening.id)
    async with live.lock.hold(
        keys.happening_lock(room.slug, happening_id), keys.happening_fence(room.slug, happening_id)
    ) as lease:
        current = await get_happening(happening_id)  # cancelled meanwhile?
        changed = await record_answer(current, user_id, display_name, value, lease.fence)
    # Read after the lock is let go: every answer ahead of this one (a smaller fence) was
    # written under it before, and the ones after it cannot push this one back.
    view = await happening_view(current)
    if changed:
        await say(live, room, answer_text(view, user_id, display_name), view)
    await publish_view(live, "rsvp", view)
    return view


def reminders_for(happening: Happening, lead_s: int, now: datetime) -> list[tuple[str, int]]:
    """(reminder, due ms) of each reminder still ahead: a lead reminder whose time has
    passed when the happening is planned or moved is not sent late."""
    start = happening.starts_at.astimezone(UTC)
    start_ms = epoch_ms(start)
    hid = str(happening.id)
    due: list[tuple[str, int]] = []
    if happening.cancelled:
        return due
    lead_ms = start_ms - lead_s * 1000
    now_ms = int(now.timestamp() * 1000)
    if lead_ms > now_ms:
        due.append((reminder_id(hid, "lead", start), lead_ms))
    if start_ms > now_ms:
        due.append((reminder_id(hid, "start", start), start_ms))
    return due


def all_reminders(happening: Happening) -> list[str]:
    hid = str(happening.id)
    return [reminder_id(hid, kind, happening.starts_at) for kind in ("lead", "start")]


async def reschedule(
    reminders: Reminders, happening: Happening, lead_s: int, old: Happening | None = None
) -> None:
    """After planning, moving or cancelling: the old start's reminders go, the new come."""
    if old is not None:
        await reminders.unschedule(all_reminders(old))
    await reminders.schedule(reminders_for(happening, lead_s, datetime.now(UTC)))


class ReminderLoop:
    """Claims due reminders and sends each to its room; one per node, all alike."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.settings = live.settings.happenings
        self.reminders = Reminders(live.redis)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: claimed and not yet sent: handed back when the node stops
        self._held: set[str] = set()
        self.sent = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="reminders")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        # A cancel that lands inside a Redis call can come back as a connection error,
        # which the loop survives by design: cancel until it is really over.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if self._held:
            try:
                await self.reminders.release(self._held)
            except (RedisError, OSError) as error:  # their leases run out instead
                log.warning("reminders.release_failed", extra={"error": str(error)})
            self._held.clear()

    async def reconcile(self) -> int:
        """Schedule again, from the store, every reminder of a coming happening that was
        never sent and is not in Redis (lost with Redis's data, or its planner's node died
        between storing the happening and scheduling it); how many."""
        now = datetime.now(UTC)
        since = now - timedelta(seconds=self.settings.reminder_max_late_s)
        lead_s = self.settings.reminder_lead_s
        wanted: list[tuple[str, int]] = []
        for happening in await coming_happenings(since - timedelta(seconds=lead_s)):
            # as scheduled at its last change: reminders already past then never were
            for member, due_ms in reminders_for(happening, lead_s, happening.updated_at):
                if due_ms < epoch_ms(since):
                    continue
                if await Message.get(reminder_message_id(member)) is None:
                    wanted.append((member, due_ms))
        restored = await self.reminders.restore(wanted)
        if restored:
            log.warning("reminders.restored", extra={"count": restored})
        return restored

    async def run(self) -> None:
        lease_ms = int(self.settings.reminder_lease_s * 1000)
        backoff = 0.1
        next_reconcile = 0.0
        while not self._stopping:
            if time.monotonic() >= next_reconcile:
                try:
                    await self.reconcile()
                except Exception:
                    log.exception("reminders.reconcile_failed")
                next_reconcile = time.monotonic() + self.settings.reminder_reconcile_s
            try:
                now_ms, claimed = await self.reminders.claim(lease_ms)
                backoff = 0.1
            except (RedisError, OSError) as error:
                log.warning("reminders.claim_failed", extra={"error": str(error)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._held.update(member for member, _ in claimed)
            for member, _due in claimed:
                try:
                    await self.send(member, now_ms)
                except Exception:
                    # Left claimed: when its lease ends another node (or this one) retries.
                    log.exception("reminders.send_failed", extra={"reminder": member})
                self._held.discard(member)
            if not claimed:
                poll = self.settings.reminder_poll_s
                await asyncio.sleep(poll * (0.5 + random.random()))  # noqa: S311

    async def send(self, member: str, now_ms: int) -> None:
        """Write and publish one claimed reminder, idempotently, then let go of it."""
        happening_id, _, rest = member.partition("|")
        kind, _, start_ms = rest.partition("|")
        try:
            happening = await get_happening(happening_id)
        except NotFound:
            happening = None
        if (
            happening is None
            or happening.cancelled
            or kind not in ("lead", "start")
            or reminder_id(happening_id, kind, happening.starts_at) != member
        ):
            await self.reminders.done(member)  # gone, cancelled or moved: not for now
            return
        lead_s = self.settings.reminder_lead_s
        due_ms = int(start_ms) - (lead_s * 1000 if kind == "lead" else 0)
        if now_ms - due_ms > self.settings.reminder_max_late_s * 1000:
            log.warning("reminders.too_late", extra={"reminder": member})
            await self.reminders.done(member)
            return
        reminder_kind: ReminderKind = "lead" if kind == "lead" else "start"
        message = Message(
            id=reminder_message_id(member),
            room=happening.room,
            author_id="",
            author_name=SYSTEM_NAME,
            text=reminder_text(happening, reminder_kind, lead_s),
        )
        try:
            await message.insert()
        except DuplicateKeyError:
            # Written by a claimer that died before acknowledging: send that one.
            stored = await Message.get(message.id)
            if stored is not None:
                message = stored
        event = chat_event(
            message,
            happening=happening_id,
            reminder={"id": member, "kind": kind, "due": due_ms},
        )
        if await self.reminders.publish_once(happening.room, member, "chat", event):
            self.sent += 1
            log.info("reminder.sent", extra={"reminder": member, "late_ms": now_ms - due_ms})
        await self.reminders.done(member)
