"""Report text as a reader sees it: the invisible characters that could hide a finding removed.

Bidirectional controls (U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C) reorder what a screen shows
("No \u202eevidence of\u202c pneumothorax" reads differently from what a labeler sees), and
zero-width characters (U+200B, U+2060, U+FEFF ...) split a word so that "Cardio\u200bmegaly" matches
nothing. Every Unicode format character (category Cf) is removed and other control characters but
tab and newlines become a space, before a report is labelled and before it is written out.
"""

from __future__ import annotations

import unicodedata

_KEPT_CONTROLS = frozenset("\t\n\r")


def strip_invisible_controls(text: str) -> str:
    """`text` without format characters (bidi controls, zero-width ones); other controls -> one space."""
    if text.isascii() and text.isprintable():
        return text  # the common case, and the cheap one
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cf":
            continue
        kept.append(" " if category == "Cc" and char not in _KEPT_CONTROLS else char)
    return "".join(kept)
