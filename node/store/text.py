"""Shared rules for human text (display names, room names, chat): NFC, no hidden controls.

NFC normalisation is quadratic in the length of a run of combining marks (canonical
reordering and composition walk the whole run for each mark): one 16,000-character chat
message of `"a"` and marks took a node ~0.4 s, with every other request and media packet
waiting. So raw input first passes `check_raw`, which costs a length test, one UTF-8 encoding
and one regular-expression scan, and refuses what no acceptable text needs: raw text far
longer than the limit, and more than `MAX_MARK_RUN` combining marks in a row. Whatever
passes it normalises in time linear in its length.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

# Joiners and variation selectors are format characters that emoji sequences need.
EMOJI_FORMAT_CHARS = frozenset({"\u200d", "\ufe0e", "\ufe0f"})
# Characters that draw as nothing although they are not format ("Cf") characters: the
# default-ignorable letters and marks (combining grapheme joiner, Hangul and Khmer fillers)
# and blanks (Braille pattern blank, object replacement). A name made of them looks empty,
# and one with them added looks like another.
INVISIBLE_CHARS = frozenset(
    {"\u034f", "\u115f", "\u1160", "\u17b4", "\u17b5", "\u2800", "\u3164", "\uffa0", "\ufffc"}
)
# Line and paragraph separators end lines as "\n" does, where "\n" is not allowed either.
_LINE_SEPARATORS = ("Zl", "Zp")

# Raw text may be longer than its limit, as NFC composes ("e" + U+0301 is one "é", decomposed
# Hangul three jamo to one syllable) and stripping drops surrounding blanks: up to 4 raw
# characters per allowed one, and 12 bytes of UTF-8 (a character is at most 4 bytes after
# NFC, and its decomposed form at most 3 times that).
RAW_CHARS_PER_CHAR = 4
RAW_BYTES_PER_CHAR = 12
# No script needs more than a handful of marks on one letter; a long run is "Zalgo" text
# or an attack on NFC.
MAX_MARK_RUN = 16
# Every code point that can be combining is in planes 0, 1 and 14 (plane 2 and 3 hold CJK
# ideographs, 15 and 16 private use); scanning just these keeps the first use quick.
_MARK_PLANES = (range(0x20000), range(0xE0000, 0xF0000))


def is_mark(char: str) -> bool:
    """A combining character: a non-spacing or enclosing mark, or any character NFC reorders
    (a non-zero canonical combining class)."""
    return unicodedata.category(char) in ("Mn", "Me") or unicodedata.combining(char) != 0


def _class(ranges: list[tuple[int, int]]) -> str:
    return "".join(
        re.escape(chr(first)) + ("-" + re.escape(chr(last)) if last > first else "")
        for first, last in ranges
    )


@dataclass(frozen=True)
class _MarkRuns:
    bmp: re.Pattern[str]
    #: any astral character that may be a mark: only text with one needs `full`
    astral_guard: re.Pattern[str]
    full: re.Pattern[str]

    def search(self, value: str) -> bool:
        return bool(
            self.bmp.search(value) or (self.astral_guard.search(value) and self.full.search(value))
        )


@functools.cache
def mark_runs() -> _MarkRuns:
    """Finds more than `MAX_MARK_RUN` marks in a row. Built once, from the Unicode data of
    this Python, so it agrees with the normaliser it protects."""
    ranges: list[tuple[int, int]] = []
    for plane in _MARK_PLANES:
        first: int | None = None
        for code in plane:
            if is_mark(chr(code)):
                if first is None:
                    first = code
            elif first is not None:
                ranges.append((first, code - 1))
                first = None
        if first is not None:
            ranges.append((first, plane[-1]))
    bmp = _class([r for r in ranges if r[1] < 0x10000])
    astral = [r for r in ranges if r[0] >= 0x10000]
    # A class of BMP characters is a bitmap for the regex engine, but one of astral
    # characters a list of ranges tried one by one: so BMP text is scanned with the first
    # pattern alone, and the second, slower one runs only on text with an astral character
    # in the span of the astral marks (one range per plane; emoji are outside it).
    guard = _class(
        [
            (min(r[0] for r in group), max(r[1] for r in group))
            for group in ([r for r in astral if r[0] >> 16 == plane] for plane in (1, 14))
            if group
        ]
    )
    run = f"{{{MAX_MARK_RUN + 1}}}"
    return _MarkRuns(
        bmp=re.compile(f"[{bmp}]{run}"),
        astral_guard=re.compile(f"[{guard}]"),
        full=re.compile(f"(?:[{bmp}]|(?=[{guard}])[{_class(astral)}]){run}"),
    )


def check_size(value: str, *, max_chars: int) -> None:
    """Refuse raw text far longer than any acceptable text of `max_chars` characters, in
    constant time or one UTF-8 encoding (ValueError naming the problem)."""
    if len(value) > RAW_CHARS_PER_CHAR * max_chars:
        raise ValueError(f"must be at most {max_chars} characters")
    max_bytes = RAW_BYTES_PER_CHAR * max_chars
    if 4 * len(value) > max_bytes and len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValueError(f"must be at most {max_chars} characters ({max_bytes} bytes)")


def check_raw(value: str, *, max_chars: int) -> None:
    """Everything NFC needs to be cheap, checked before it at a cost linear in the length:
    the size, then runs of combining marks (ValueError naming the problem)."""
    check_size(value, max_chars=max_chars)
    if mark_runs().search(value):
        raise ValueError(f"must not have more than {MAX_MARK_RUN} combining marks in a row")


def is_hidden(char: str) -> bool:
    """A control, unassigned, private-use or invisible character (emoji joiners excepted)."""
    category = unicodedata.category(char)
    return (
        category in ("Cc", "Cs", "Co", "Cn")
        or (category == "Cf" and char not in EMOJI_FORMAT_CHARS)
        or char in INVISIBLE_CHARS
    )


def clean_text(value: str, *, max_chars: int, allow_newlines: bool = False) -> str:
    """NFC-normalised, stripped text, or ValueError naming the problem."""
    check_raw(value, max_chars=max_chars)
    text = unicodedata.normalize("NFC", value)
    if allow_newlines:
        text = text.replace("\r\n", "\n")
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    if len(text) > max_chars:
        raise ValueError(f"must be at most {max_chars} characters")
    visible = False
    for char in text:
        category = unicodedata.category(char)
        if allow_newlines and char in "\n\t":
            continue
        if is_hidden(char) or category in _LINE_SEPARATORS:
            raise ValueError(
                f"must not contain control or invisible characters (U+{ord(char):04X})"
            )
        visible = visible or category[0] in "LNPS"
    if not visible:
        raise ValueError("must contain a visible character")
    return text
