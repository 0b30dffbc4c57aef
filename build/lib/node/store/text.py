"""Shared rules for human text (display names, room names, chat): NFC, no hidden controls."""

from __future__ import annotations

import unicodedata

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
