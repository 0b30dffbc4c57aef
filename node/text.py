"""Shared rules for human text (display names, room names, chat): NFC, no hidden controls."""

from __future__ import annotations

import unicodedata

# Joiners and variation selectors are format characters that emoji sequences need.
EMOJI_FORMAT_CHARS = frozenset({"\u200d", "\ufe0e", "\ufe0f"})


def clean_text(value: str, *, max_chars: int, allow_newlines: bool = False) -> str:
    """NFC-normalised, stripped text, or ValueError naming the problem."""
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise ValueError("must not be empty")
    if len(text) > max_chars:
        raise ValueError(f"must be at most {max_chars} characters")
    for char in text:
        category = unicodedata.category(char)
        if allow_newlines and char in "\n\t":
            continue
        if category in ("Cc", "Cs", "Co", "Cn") or (
            category == "Cf" and char not in EMOJI_FORMAT_CHARS
        ):
            raise ValueError(
                f"must not contain control or invisible characters (U+{ord(char):04X})"
            )
    return text
