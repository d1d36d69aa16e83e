"""Keys this process has checked, kept in memory while PostgreSQL tells it about changes.

Authenticating a request costs a database round trip; on the inference hot path that is most
of what tunegate adds to a completion. So each API process remembers the keys it has checked
(by their SHA-256, never the key) for `TUNEGATE_AUTH__KEY_CACHE_TTL`, but only while it holds a
connection LISTENing on `tunegate_api_keys`, where a trigger on `api_keys` announces every
revocation, deletion or change at commit (migration 6b1f0c2e9a41). A revoked key is refused
by every process as soon as the revocation commits, not after the TTL.

Without that connection (not started, or lost) nothing is served from memory and every request
asks the database, as before; the listener is reopened in the background at most every 30 s.
A check that raced with a notification is not stored (the generation counter moved), so a
revocation that lands between a database read and its caching is not lost either.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from app.auth.service import Principal
from app.kit.logging import get_logger

__all__ = ["NOTIFY_CHANNEL", "KeyCache"]

log = get_logger("tunegate.auth.cache")

NOTIFY_CHANNEL: Final = "tunegate_api_keys"
LISTEN_RETRY_SECONDS: Final = 30.0
# Entries beyond this are dropped oldest-first: memory stays bounded however many keys call.
MAX_ENTRIES: Final = 100_000


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    expires: float


class KeyCache:
    def __init__(self, ttl_seconds: float, registry: CollectorRegistry | None = None) -> None:
        self.ttl = ttl_seconds
        lookups = Counter(
            "tunegate_api_key_checks",
            "API key checks by where the answer came from (cache or database).",
            ["source"],
            registry=registry,
        )
        self._from_cache = lookups.labels("cache")
        self._from_database = lookups.labels("database")
        self.generation = 0
        self._entries: dict[str, _Entry] = {}
        self._dsn: str | None = None
        self._listener: Any = None
        self._next_attempt = 0.0
        self._connecting: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    def get(self, key_hash: str) -> Principal | None:
        """The principal of a key checked recently, or None (then ask the database)."""
        if not self.listening:
            self._reconnect_later()
            self._from_database.inc()
            return None
        entry = self._entries.get(key_hash)
        if entry is None or entry.expires < time.monotonic():
            self._entries.pop(key_hash, None)
            self._from_database.inc()
            return None
        self._from_cache.inc()
        return entry.principal

    def put(self, key_hash: str, principal: Principal, generation: int) -> None:
        """Remember a key read from the database when `generation` (read before the query)
        is still current: no change was announced while the query ran."""
        if generation != self.generation or not self.listening or self.ttl <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
        self._entries[key_hash] = _Entry(principal, time.monotonic() + self.ttl)

    def forget_key(self, key_id: str) -> None:
        self.generation += 1
        stale = [h for h, entry in self._entries.items() if entry.principal.key_id == key_id]
        for key_hash in stale:
            del self._entries[key_hash]

    async def start(self, dsn: str) -> None:
        """Open the listening connection (`dsn`: a plain asyncpg URL). Failing is not fatal:
        keys are then checked in the database on every request."""
        self._dsn = dsn
        if self.ttl <= 0:
            return
        await self._listen()

    async def close(self) -> None:
        self._dsn = None
        if self._connecting is not None:
            self._connecting.cancel()
        listener, self._listener = self._listener, None
        self._entries.clear()
        if listener is not None and not listener.is_closed():
            await listener.close()

    async def _listen(self) -> None:
        self._next_attempt = time.monotonic() + LISTEN_RETRY_SECONDS
        if self._dsn is None:
            return
        try:
            listener = await asyncpg.connect(self._dsn, timeout=5)
            listener.add_termination_listener(self._lost)
            await listener.add_listener(NOTIFY_CHANNEL, self._changed)
        except Exception as exc:  # any failure means: no cache for now
            log.warning("API keys are checked in the database: LISTEN failed", error=repr(exc))
            return
        self._entries.clear()  # changes may have been missed while nobody listened
        self.generation += 1
        self._listener = listener

    def _reconnect_later(self) -> None:
        if self._dsn is None or self.ttl <= 0 or self._connecting is not None:
            return
        if time.monotonic() < self._next_attempt:
            return

        async def reconnect() -> None:
            try:
                await self._listen()
            finally:
                self._connecting = None

        self._connecting = asyncio.get_running_loop().create_task(reconnect())

    def _changed(self, _connection: Any, _pid: int, _channel: str, key_id: str) -> None:
        self.forget_key(key_id)

    def _lost(self, _connection: Any) -> None:
        log.warning("API key notifications lost; checking keys in the database until back")
        self._listener = None
        self.generation += 1
        self._entries.clear()
