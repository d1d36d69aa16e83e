"""Usage accounting off the hot path: requests append a record to an in-memory buffer; a
background task writes the buffer in one INSERT every `TUNEGATE_INFERENCE__USAGE_FLUSH_INTERVAL`
(or as soon as it holds `USAGE_BATCH` records), and once more when the app shuts down. A
process that dies loses at most the last interval's records; a failing write is retried with
the next batch (up to `MAX_BUFFERED` records are kept, then the oldest are dropped and logged).
`flush()` may also be awaited by a request that needs this process's records written now
(feedback about a request just answered): it returns once every record it found is written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.kit.logging import get_logger
from app.models import UsageRecord

log = get_logger("tunegate.inference.usage")

USAGE_BATCH = 500
MAX_BUFFERED = 100_000
_INSERT = insert(UsageRecord)


class UsageRecorder:
    def __init__(
        self, sessionmaker: Callable[[], async_sessionmaker[AsyncSession]], interval: float
    ) -> None:
        # A callable: the app's database is opened by the lifespan, after the recorder exists.
        self._sessionmaker = sessionmaker
        self._interval = interval
        self._buffer: list[dict[str, Any]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        # One write at a time, so a flush that finds the buffer empty still waits for the
        # records another flush has taken and not yet written.
        self._writing = asyncio.Lock()
        self._closing = False

    def record(self, **row: Any) -> None:
        self._buffer.append(row)
        if len(self._buffer) > MAX_BUFFERED:
            dropped = len(self._buffer) - MAX_BUFFERED
            del self._buffer[:dropped]
            log.error("usage records dropped: the database is not taking them", count=dropped)
        if len(self._buffer) >= USAGE_BATCH:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="usage:flush")

    async def _flush_loop(self) -> None:
        while self._buffer and not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self._interval)
            self._full.clear()
            if not await self.flush() and not self._closing:
                await asyncio.sleep(self._interval)

    async def flush(self) -> bool:
        """Write the buffered records; False when the database did not take them (they are
        kept for the next try)."""
        async with self._writing:
            batch, self._buffer = self._buffer, []
            if not batch:
                return True
            try:
                async with self._sessionmaker()() as session, session.begin():
                    await session.execute(_INSERT, batch)
            except Exception:
                log.exception("could not write usage records; keeping them for the next try")
                self._buffer[:0] = batch
                return False
            return True

    async def close(self) -> None:
        """Let a write under way finish, then write what is left (once)."""
        self._closing = True
        self._full.set()
        if self._flusher is not None:
            await self._flusher
        await self.flush()
        if self._buffer:
            log.error("usage records lost at shutdown", count=len(self._buffer))
