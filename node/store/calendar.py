"""iCalendar (RFC 5545) files of happenings: one event, or a room's feed.

Built with `icalendar`: each event's times are written in the zone it was planned in, with
that zone's VTIMEZONE (its DST rules) included, so a calendar app shows the same instants
whatever zone it is in, on both sides of a clock change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from icalendar import Calendar, Event

from node.store.happenings import Happening
from node.store.rooms import room_url

PRODID = "-//sfumesh//happenings//EN"


def _in_zone(value: datetime, zone: str) -> datetime:
    utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return utc.astimezone(ZoneInfo(zone))


def _event(happening: Happening, base_url: str) -> Event:
    event = Event()
    event.add("uid", f"{happening.id}@sfumesh")
    event.add("dtstamp", datetime.now(UTC))
    event.add("dtstart", _in_zone(happening.starts_at, happening.zone))
    if happening.ends_at is not None:
        event.add("dtend", _in_zone(happening.ends_at, happening.zone))
    event.add("summary", happening.title)
    if happening.description:
        event.add("description", happening.description)
    if happening.place:
        event.add("location", happening.place)
    event.add("url", happening.place_url or room_url(base_url, happening.room))
    event.add("last-modified", happening.updated_at)
    event.add("status", "CANCELLED" if happening.cancelled else "CONFIRMED")
    return event


def calendar_of(happenings: list[Happening], base_url: str, name: str | None = None) -> bytes:
    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    if name is not None:
        calendar.add("x-wr-calname", name)
    for happening in happenings:
        calendar.add_component(_event(happening, base_url))
    calendar.add_missing_timezones()
    ical: bytes = calendar.to_ical()
    return ical
