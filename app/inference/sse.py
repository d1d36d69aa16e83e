"""Server-sent events as a provider streams them: cut at blank lines whatever the line ends
(LF, CRLF, CR) and however the bytes arrive, the `data` of each event joined, comments and
events without data skipped, `[DONE]` the end. Used by the completion proxy (`proxy.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.kit.upstream import UpstreamResponse
from app.providers.base import ProviderServerError

__all__ = ["event_data", "split_events", "sse_data"]


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete server-sent events at the start of `buffer`, and what is left of it. Lines end
    with LF, CRLF or CR; a CR at the very end may be the first half of a CRLF, so it waits."""
    if b"\r" in buffer:
        held = buffer.endswith(b"\r")
        body = buffer[:-1] if held else buffer
        buffer = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
    blocks = buffer.split(b"\n\n")
    return blocks[:-1], blocks[-1]


def event_data(block: bytes) -> bytes | None:
    """The `data` of one event (its data lines joined), or None for a comment or an event
    without data."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]  # the usual event: one data line
    lines = [line[5:] for line in block.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


async def sse_data(answer: UpstreamResponse, max_event_bytes: int) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event of an answer, up to `[DONE]` or its end."""
    buffer = b""
    async for piece in answer:
        buffer += piece
        if b"\n" in piece or b"\r" in piece:
            events, buffer = split_events(buffer)
            for block in events:
                data = event_data(block)
                if data is None:
                    continue
                if data == b"[DONE]":
                    return
                yield data
        # What waits for its blank line, whether or not lines have ended in it.
        if len(buffer) > max_event_bytes:
            raise ProviderServerError("An event of the provider's stream is too large.")
