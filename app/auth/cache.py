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
revocation that lands between a database read and its caching is not lost either. The process
that revokes a key forgets it at once; the others when the notification arrives (on loopback,
within a millisecond of the commit). A `TRUNCATE api_keys` notifies `*`: everything is
forgotten. Every `HEARTBEAT_SECONDS` the listener notifies itself; when that does not come back
(a connection pooler in transaction mode swallows notifications, a connection half dead), the
cache treats the listener as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
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
HEARTBEAT_SECONDS: Final = 15.0
HEARTBEAT_PATIENCE_SECONDS: Final = 5.0
_EVERYTHING: Final = "*"
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
        self._hashes_of: dict[str, set[str]] = {}  # key id -> the hashes cached for it
        self._dsn: str | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._echo: asyncio.Event | None = None
        self._echo_token = ""
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
            self._drop(key_hash)
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
            self._drop(next(iter(self._entries)))
        self._entries[key_hash] = _Entry(principal, time.monotonic() + self.ttl)
        self._hashes_of.setdefault(principal.key_id, set()).add(key_hash)

    def forget_key(self, key_id: str) -> None:
        """Stop trusting a key (revoked, deleted or changed); `*` forgets every key."""
        self.generation += 1
        if key_id == _EVERYTHING:
            self._clear()
            return
        for key_hash in self._hashes_of.pop(key_id, ()):
            self._entries.pop(key_hash, None)

    def _drop(self, key_hash: str) -> None:
        entry = self._entries.pop(key_hash, None)
        if entry is not None:
            hashes = self._hashes_of.get(entry.principal.key_id)
            if hashes is not None:
                hashes.discard(key_hash)
                if not hashes:
                    del self._hashes_of[entry.principal.key_id]

    def _clear(self) -> None:
        self._entries.clear()
        self._hashes_of.clear()

    async def start(self, dsn: str) -> None:
        """Open the listening connection (`dsn`: a plain asyncpg URL). Failing is not fatal:
        keys are then checked in the database on every request."""
        self._dsn = dsn
        if self.ttl <= 0:
            return
        await self._listen()

    async def close(self) -> None:
        self._dsn = None
        for task in (self._connecting, self._heartbeat):
            if task is not None:
                task.cancel()
        listener, self._listener = self._listener, None
        self._clear()
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
        self._clear()  # changes may have been missed while nobody listened
        self.generation += 1
        self._listener = listener
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        """Notify ourselves now and then; a notification that does not come back means the
        listener hears nothing, so the cache must not be trusted."""
        while self._dsn is not None:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            listener = self._listener
            if listener is None or listener.is_closed():
                continue
            self._echo = asyncio.Event()
            self._echo_token = f"heartbeat:{id(self)}:{time.monotonic()}"
            try:
                await listener.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, self._echo_token)
                await asyncio.wait_for(self._echo.wait(), HEARTBEAT_PATIENCE_SECONDS)
            except Exception as exc:  # no echo, or the connection failed
                log.warning("API key notifications not heard back", error=type(exc).__name__)
                if listener is self._listener:
                    self._lost(listener)
                    with contextlib.suppress(Exception):
                        await listener.close()

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

    def _changed(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith("heartbeat:"):
            if payload == self._echo_token and self._echo is not None:
                self._echo.set()
            return
        self.forget_key(payload)

    def _lost(self, _connection: Any) -> None:
        log.warning("API key notifications lost; checking keys in the database until back")
        self._listener = None
        self.generation += 1
        self._clear()
