"""R8, who gets a seat: for any sequence of answers and any capacity, the seats derived from
the answers alone (node/store/happenings.py `seats`) fill up to the capacity in the order the
"going" answers were given, the rest wait in that order, and a drop-out moves the line up."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from node.store.happenings import Answer, Happening, Rsvp, RsvpView, seats

PEOPLE = [f"person{i}" for i in range(8)]
ANSWERS: list[Answer] = ["going", "maybe", "not_going"]

answers = st.lists(st.tuples(st.sampled_from(PEOPLE), st.sampled_from(ANSWERS)), max_size=40)
capacities = st.none() | st.integers(min_value=1, max_value=len(PEOPLE) + 1)


def happening(capacity: int | None) -> Happening:
    made: Happening = Happening.model_construct(
        room="lobby",
        title="Picnic",
        starts_at=datetime(2026, 3, 29, 3, tzinfo=UTC),
        zone="Asia/Ho_Chi_Minh",
        capacity=capacity,
        creator_id="owner",
        creator_name="Owner",
    )
    return made


def record(stored: dict[str, Rsvp], user_id: str, answer: Answer, fence: int) -> None:
    """What `record_answer` does under the lock: the same answer again keeps its place."""
    current = stored.get(user_id)
    if current is not None and current.answer == answer:
        return
    stored[user_id] = Rsvp.model_construct(
        id=Rsvp.key("h", user_id),
        happening_id="h",
        user_id=user_id,
        display_name=user_id.title(),
        answer=answer,
        seq=fence,
    )


@settings(max_examples=400, deadline=None)
@given(answers, capacities)
def test_seats_fill_in_answer_order_and_the_line_moves_up(
    given_answers: list[tuple[str, Answer]], capacity: int | None
) -> None:
    event = happening(capacity)
    stored: dict[str, Rsvp] = {}
    before: list[RsvpView] = []
    for fence, (user_id, answer) in enumerate(given_answers, start=1):
        was = next((r for r in before if r.user_id == user_id), None)
        record(stored, user_id, answer, fence)
        views = seats(event, list(stored.values()))
        assert sorted(v.user_id for v in views) == sorted(stored)
        seq = {user_id: rsvp.seq for user_id, rsvp in stored.items()}
        wanting = sum(r.answer == "going" for r in stored.values())
        going = [v for v in views if v.status == "going"]
        waiting = [v for v in views if v.status == "waitlisted"]
        assert len(going) == (wanting if capacity is None else min(capacity, wanting))
        assert len(going) + len(waiting) == wanting
        # the line is 1..k, in the order the answers were given, behind everyone going
        assert [v.position for v in waiting] == list(range(1, len(waiting) + 1))
        assert [seq[v.user_id] for v in waiting] == sorted(seq[v.user_id] for v in waiting)
        if going and waiting:
            assert max(seq[v.user_id] for v in going) < min(seq[v.user_id] for v in waiting)
        for view in views:
            if view.status in ("maybe", "not_going"):
                assert view.answer == view.status and view.position is None
        line_before = [v.user_id for v in before if v.status == "waitlisted"]
        if was is not None and was.status == "going" and answer != "going" and line_before:
            # a drop-out: the first waiting takes the seat, the others move up by one
            status = {v.user_id: v for v in views}
            assert status[line_before[0]].status == "going"
            assert [v.user_id for v in waiting] == line_before[1:]
        if answer == "going" and (was is None or was.answer != "going") and waiting:
            # a new "going" joins the end of the line (when there is one)
            assert waiting[-1].user_id == user_id
        before = views
