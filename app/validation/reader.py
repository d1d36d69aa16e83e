"""Streaming line reader: fixed-size chunks in, lines out, never more than one line's limit held.

Lines are cut at `\\n` (a `\\r` before it stays and is JSON whitespace), a UTF-8 BOM at the start
of the file is dropped, and line numbers count every physical line, blank ones included, as an
editor shows them. A line longer than `max_line_bytes` is not kept: its first part is dropped as
soon as it passes the limit and the rest is skipped chunk by chunk, so memory stays bounded by
the limit plus one chunk whatever the file holds (a 50 MB line, a binary file without newlines).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

__all__ = ["CHUNK_BYTES", "Chunk", "read_lines", "size_text", "too_long_message"]

# A chunk and the lines split from it stay in the CPU's cache, and the buffer stays under the
# 1 MiB mmap threshold (memory.py), so malloc reuses it instead of mapping and faulting in fresh
# pages for every read: reading takes about half the time it takes in 1 MiB chunks.
CHUNK_BYTES: Final = 256 * 1024
_BOM: Final = codecs.BOM_UTF8


@dataclass(frozen=True)
class Chunk:
    """The lines completed by one read of the file.

    `lines[i]` is line number `first_line + i`; it is None when that line was longer than the
    limit (its bytes were dropped). Blank lines are included, as empty or whitespace bytes. A
    line that spanned reads is a bytearray (it was assembled in place, never copied).
    `bytes_done` counts the bytes read from the file so far.
    """

    first_line: int
    lines: list[bytes | bytearray | None]
    bytes_done: int


def read_lines(f: BinaryIO, max_line_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Read `f` to the end, one `Chunk` per read (possibly with no lines, inside a long line)."""
    carry = bytearray()  # the start of the current, unfinished line
    skipping = False  # inside a line that passed the limit
    next_line = 1
    bytes_done = 0
    first = True
    while data := f.read(chunk_bytes):
        bytes_done += len(data)
        if first:
            first = False
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        parts: list[bytes | bytearray | None] = list(data.split(b"\n"))
        tail = parts.pop()  # after the last newline: the start of an unfinished line
        assert tail is not None
        if parts:
            head = parts[0]
            assert head is not None
            if skipping:
                parts[0] = None  # the end of the long line
                skipping = False
            elif carry:
                if len(carry) + len(head) > max_line_bytes:
                    parts[0] = None
                else:
                    carry += head
                    parts[0] = carry
                carry = bytearray()
            if len(data) > max_line_bytes:  # only then can a whole line in it be too long
                for i, part in enumerate(parts):
                    if part is not None and len(part) > max_line_bytes:
                        parts[i] = None
        if not skipping and tail:
            if len(carry) + len(tail) > max_line_bytes:
                carry, skipping = bytearray(), True
            else:
                carry += tail
        yield Chunk(next_line, parts, bytes_done)
        next_line += len(parts)
    if skipping:
        yield Chunk(next_line, [None], bytes_done)
    elif carry:
        yield Chunk(next_line, [carry], bytes_done)


def size_text(size: int) -> str:
    """A byte limit as people read it: "8 MiB", or "500 bytes" below one MiB."""
    return f"{size / (1024 * 1024):g} MiB" if size >= 1024 * 1024 else f"{size} bytes"


def too_long_message(max_line_bytes: int) -> str:
    """The `line_too_long` occurrence message, the same for JSONL and CSV files."""
    return f"the line is longer than {size_text(max_line_bytes)}; it was skipped"
