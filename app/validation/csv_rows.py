"""CSV files with prompt and completion columns: counted, not validated deeply.

OpenAI does not take CSV, so such a file gets `unsupported_format` (it must be converted first)
but still its example count. Rows are read through the bounded line reader, so a giant line is
skipped as `line_too_long` like in JSONL, and a quoted field that never closes stops the count
once it passes the line-length limit instead of swallowing the file.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from typing import BinaryIO

from app.validation.issues import IssueLog
from app.validation.reader import read_lines, size_text, too_long_message

__all__ = ["CsvCount", "count_csv_rows", "is_csv_header"]


class _RowTooLong(Exception):
    pass


def is_csv_header(line: bytes | bytearray) -> bool:
    """Whether a (first, non-JSON) line is a CSV header with prompt and completion columns."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return False
    columns = next(csv.reader([text]), [])
    return {"prompt", "completion"} <= {column.strip().lower() for column in columns}


class CsvCount:
    """The outcome of counting: data rows, physical lines and bytes read."""

    def __init__(self) -> None:
        self.rows = 0
        self.lines = 0
        self.bytes = 0


def count_csv_rows(
    f: BinaryIO,
    issues: IssueLog,
    max_line_bytes: int,
    progress: Callable[[int, int], None],
) -> CsvCount:
    """Count the data rows (blank rows skipped, the header not counted) of a CSV file."""
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    outcome = CsvCount()
    pending = [0]  # characters fed since the last complete row

    def lines() -> Iterator[str]:
        for chunk in read_lines(f, max_line_bytes):
            number = chunk.first_line
            for raw in chunk.lines:
                if raw is None:
                    issues.add("line_too_long", number, None, too_long_message(max_line_bytes))
                    raw = b""
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    issues.add(
                        "invalid_utf8",
                        number,
                        None,
                        f"byte 0x{raw[exc.start]:02x} at position {exc.start + 1} is not UTF-8",
                    )
                    text = ""
                pending[0] += len(text)
                if pending[0] > max_line_bytes:
                    raise _RowTooLong(number)
                yield text + "\n"
                number += 1
            outcome.lines = number - 1
            outcome.bytes = chunk.bytes_done
            progress(chunk.bytes_done, outcome.lines)

    reader = csv.reader(lines(), strict=True)
    header_seen = False
    try:
        for row in reader:
            pending[0] = 0
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header_seen:
                outcome.rows += 1
            else:
                header_seen = True
    except csv.Error as exc:
        issues.add("invalid_csv", reader.line_num, None, f"the row cannot be read: {exc}")
    except _RowTooLong as exc:
        issues.add(
            "invalid_csv",
            exc.args[0],
            None,
            f"a row reaches past {size_text(max_line_bytes)}: a quoted field is probably never "
            "closed; counting stopped here",
        )
    return outcome
