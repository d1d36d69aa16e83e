"""Runs worker roles as asyncio tasks and stops them gracefully.

A role is an async callable `loop(context, stop)` that works until `stop` is set. `tunegate
serve` runs every registered role inside the API process (the embedded default); production runs
`tunegate serve --no-workers` plus `tunegate worker --role ...` processes. Domains register their
roles in `ROLES` (see each domain's `tasks.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from app.config import Settings
from app.db.engine import Database
from app.kit.logging import get_logger
from app.kit.metrics import SyncMetrics, WebhookMetrics

log = get_logger("tunegate.workers")


@dataclass
class WorkerContext:
    settings: Settings
    database: Database
    # The API's registry when workers run inside `tunegate serve`; `tunegate worker` serves its
    # own on --metrics-port.
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    sync_metrics: SyncMetrics = field(init=False)
    webhook_metrics: WebhookMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.sync_metrics = SyncMetrics(self.registry)
        self.webhook_metrics = WebhookMetrics(self.registry)


RoleLoop = Callable[[WorkerContext, asyncio.Event], Awaitable[None]]

ROLES: dict[str, RoleLoop] = {}


def register_role(name: str, loop: RoleLoop) -> None:
    ROLES[name] = loop


async def take_work_until_stopped(
    stop: asyncio.Event, poll_seconds: float, take_one: Callable[[], Awaitable[bool]]
) -> None:
    """A queue worker's loop: `take_one` again at once while it finds work (True), after
    `poll_seconds` when it finds none, until `stop` is set (which cuts the wait short)."""
    while not stop.is_set():
        if await take_one():
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=poll_seconds)


class WorkerRunner:
    def __init__(self, context: WorkerContext, roles: Iterable[str]) -> None:
        unknown = [role for role in roles if role not in ROLES]
        if unknown:
            known = ", ".join(sorted(ROLES)) or "none"
            raise ValueError(f"unknown worker role(s) {', '.join(unknown)}; known: {known}")
        self.context = context
        self.roles = list(roles)
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self.roles:
            log.warning("no worker roles to run; waiting for a stop signal")
        for role in self.roles:
            self.tasks.append(asyncio.create_task(self._run(role), name=f"worker:{role}"))
        log.info("workers started", roles=self.roles)

    async def _run(self, role: str) -> None:
        # A crashing loop restarts after a pause instead of silently stopping its role.
        while not self.stop_event.is_set():
            try:
                await ROLES[role](self.context, self.stop_event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker role crashed; restarting in 5 s", role=role)
                try:
                    await asyncio.wait_for(self.stop_event.wait(), timeout=5)
                except TimeoutError:
                    pass

    async def stop(self, grace_seconds: float = 20.0) -> None:
        self.stop_event.set()
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        log.info("workers stopped", roles=self.roles)
