"""File names of any encoding as text that every output (JSON, HTML, CSV, the terminal) can hold.

Python hands a file name that is not valid UTF-8 over as a str with surrogate escapes
(`os.fsdecode`): it opens the file fine, but writing it as UTF-8 text fails. Ids and names cyclex
writes are made printable here, once, where they are made; the path used to open the file is kept.
"""

from __future__ import annotations


def printable_text(text: str) -> str:
    r"""`text`, with the bytes of a non-UTF-8 file name written as \xNN (b"caf\xe9" -> "caf\\xe9").

    Valid text is returned unchanged. Lone surrogates that are not escaped bytes become \udNNN.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name byte made
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return raw.decode("utf-8", errors="backslashreplace")
