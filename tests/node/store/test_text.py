"""The cheap checks before NFC (issue 21, item 1): what they refuse, what they let through,
and that they agree with this Python's Unicode data."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest

from node.store.messages import MAX_CHAT_CHARS, clean_chat_text
from node.store.rooms import normalize_slug
from node.store.text import MAX_MARK_RUN, check_raw, clean_text, is_mark, mark_runs


@pytest.fixture
def normalised(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The lengths of every string NFC-normalised while the test runs."""
    seen: list[int] = []
    normalize = unicodedata.normalize

    def counting(form: Any, value: str) -> str:
        seen.append(len(value))
        return normalize(form, value)

    monkeypatch.setattr(unicodedata, "normalize", counting)
    yield seen


# The measured attack ("a" + 15,999 marks), and its variants: marks of two combining
# classes (reordered by NFC), an astral mark, one decomposing into two marks.
ATTACKS = {
    "one-mark": "a" + "\u0301" * 15_999,
    "two-classes": "a" + "\u0301\u0316" * 7_999,
    "astral-marks": "a" + "\U0001d165" * 8_000,
    "decomposing-mark": "a" + "\u0f73" * 15_999,
    "enclosing-marks": "a" + "\u20dd" * 15_999,
    "after-text": "hello " * 100 + "a" + "\u0301\u0316" * 7_000,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_mark_runs_are_refused_before_nfc(name: str, normalised: list[int]) -> None:
    with pytest.raises(ValueError, match="combining marks in a row"):
        clean_chat_text(ATTACKS[name])
    assert normalised == []


def test_too_long_is_refused_before_nfc(normalised: list[int]) -> None:
    with pytest.raises(ValueError, match="at most 4000 characters"):
        clean_chat_text("x" * (4 * MAX_CHAT_CHARS + 1))
    # 12,001 emoji: within 4 characters per allowed one, over 12 bytes.
    with pytest.raises(ValueError, match="bytes"):
        clean_chat_text("\U0001f389" * (3 * MAX_CHAT_CHARS + 1))
    assert normalised == []


def test_slugs_are_checked_before_nfc(normalised: list[int]) -> None:
    with pytest.raises(ValueError, match="combining marks"):
        normalize_slug("a" + "\u0301\u0316" * 40)
    with pytest.raises(ValueError, match="at most 48"):
        normalize_slug("a" * 10_000)
    assert normalised == []


def test_what_passes_is_normalised_once(normalised: list[int]) -> None:
    """Runs up to the cap are real text (stacked Vietnamese or Thai marks, emoji with
    modifiers): accepted, and normalised in one pass over the raw text."""
    text = ("a" + "\u0316\u0301" * (MAX_MARK_RUN // 2) + " ") * 200
    assert clean_text(text, max_chars=4000) == unicodedata.normalize("NFC", text).strip()
    assert normalised[0] == len(text)
    for ok in ("Tiếng Việt", "ệ\u0323\u0302", "👩🏽‍💻 ok", "𝐇𝐞𝐥𝐥𝐨 " * 10, "กี่ปี"):
        check_raw(ok, max_chars=64)


def test_mark_run_boundary() -> None:
    check_raw("a" + "\u0301" * MAX_MARK_RUN, max_chars=64)
    check_raw("a" + "\U0001d165" * MAX_MARK_RUN + "b" + "\u0301" * MAX_MARK_RUN, max_chars=64)
    for mark in ("\u0301", "\U0001d165", "\U000e0100", "\u0f73"):
        with pytest.raises(ValueError):
            check_raw("a" + mark * (MAX_MARK_RUN + 1), max_chars=64)
    # BMP and astral marks in one run count together.
    with pytest.raises(ValueError):
        check_raw("a" + "\u0301" * 8 + "\U0001d165" * 9, max_chars=64)


def test_the_mark_classes_match_the_unicode_data() -> None:
    """The patterns are built from planes 0, 1 and 14 only: no mark lies anywhere else, and
    every mark (and nothing else) makes a run."""
    runs = mark_runs()
    for code in range(0x110000):
        char = chr(code)
        mark = is_mark(char)
        if not (code < 0x20000 or 0xE0000 <= code < 0xF0000):
            assert not mark, hex(code)
            continue
        if mark or code % 97 == 0:  # every mark, and a sample of the rest
            assert runs.search(char * (MAX_MARK_RUN + 1)) is mark, hex(code)
