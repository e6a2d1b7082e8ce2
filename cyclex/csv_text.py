"""CSV files that people hand to cyclex or open in a spreadsheet (core: standard library only).

- `read_csv_rows` reads a text CSV as the user wrote it: a UTF-8 byte-order mark is dropped from the
  header, every cell is text (the words ``NaN`` / ``None`` stay words, as with pandas'
  ``keep_default_na=False``), a cell may be as long as the file (the csv module's default limit is
  128 KiB), and a file in another encoding raises `CsvEncodingError` naming the file, the line, the
  encoding expected and how to pass another.
- `spreadsheet_safe` and `csv_bytes` write cells a spreadsheet shows as text: a cell starting with
  ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading ``'`` (OWASP's rule against CSV
  injection), so a report or a file name is never run as a formula.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_ENCODING = "utf-8"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
ESCAPE_PREFIX = "'"


class CsvEncodingError(ValueError):
    """A CSV file that does not decode with the encoding it was read with."""


def _decode(path: Path, data: bytes, encoding: str) -> str:
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise CsvEncodingError(
            f"{str(path)!r} is not {encoding} text: byte 0x{data[error.start]:02x} at offset {error.start} "
            f"(line {line}) does not decode; save the file as UTF-8, or name its encoding "
            f"(e.g. --encoding latin-1)") from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} for {str(path)!r}; expected a Python codec name such "
                         "as utf-8, latin-1 or cp1252") from None
    return text[1:] if text.startswith("\ufeff") else text  # a BOM written in any Unicode encoding


def read_csv_rows(path: str | os.PathLike, *, encoding: str = DEFAULT_ENCODING,
                  what: str = "CSV file") -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file; each row maps every header name to its cell text ('' when missing).

    Raises `FileNotFoundError` naming `what` and the path, `CsvEncodingError` for text in another
    encoding, and `ValueError` (naming the file and line) for a malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    text = _decode(path, path.read_bytes(), encoding)
    previous_limit = csv.field_size_limit()
    # a field is never longer than the file it sits in; the limit is global, so it is put back after
    csv.field_size_limit(max(previous_limit, len(text) + 1))
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, [])
            # short rows padded with '', blank lines skipped (as DictReader); a row longer than the header is an
            # error: it is most often a report with an unquoted comma, whose tail would be dropped unseen
            rows = []
            for cells in reader:
                if len(cells) > len(header):
                    raise ValueError(f"{what} {str(path)!r} line {reader.line_num}: {len(cells)} cells but the header "
                                     f"names {len(header)} columns; quote cells that contain commas")
                if cells:
                    rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True)))
        except csv.Error as error:
            raise ValueError(f"{what} {str(path)!r} is not a valid CSV file (line {reader.line_num}): "
                             f"{error}") from None
    finally:
        csv.field_size_limit(previous_limit)
    return header, rows


def spreadsheet_safe(cell: object) -> object:
    """`cell` with a leading ' when it is text a spreadsheet would read as a formula; other values as is."""
    if isinstance(cell, str) and cell.startswith(FORMULA_PREFIXES):
        return ESCAPE_PREFIX + cell
    return cell


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]], *, text_columns: Iterable[int],
              errors: str = "strict") -> bytes:
    """The UTF-8 bytes of a CSV file; cells in `text_columns` (free text, file names) pass `spreadsheet_safe`.

    Code columns (CheXpert's -1 for uncertain) are not text and stay as they are. `errors` is the
    encoder's error handler ('surrogateescape' writes OS file names back as their own bytes).
    """
    escaped = frozenset(text_columns)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow([spreadsheet_safe(name) for name in header])
    for row in rows:
        writer.writerow([spreadsheet_safe(cell) if i in escaped else cell for i, cell in enumerate(row)])
    return buffer.getvalue().encode("utf-8", errors=errors)
