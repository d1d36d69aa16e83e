"""A request-rate budget per provider, shared by every replica through the database.

A token bucket in one row per provider (`provider_rate_budgets`): it refills at `rate` tokens
per second up to `capacity`, and `take` atomically grants up to the tokens asked for (row lock,
database clock), so ten syncer processes together stay under the provider's limit exactly as
one would. A caller that used fewer requests than it took gives them back with `refund`.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import ProviderRateBudget


def capacity_for(rate: float) -> float:
    """A burst of one second's worth, and never less than one sync's requests."""
    return max(rate, 3.0)


async def take(
    sessionmaker: async_sessionmaker[AsyncSession], provider: str, wanted: int, rate: float
) -> int:
    """Grant up to `wanted` requests now (0 when the bucket is empty)."""
    if wanted <= 0:
        return 0
    capacity = capacity_for(rate)
    async with sessionmaker() as session, session.begin():
        await session.execute(
            insert(ProviderRateBudget)
            .values(provider=provider, tokens=capacity, updated_at=func.clock_timestamp())
            .on_conflict_do_nothing()
        )
        row = (
            await session.execute(
                select(
                    ProviderRateBudget.tokens,
                    func.extract("epoch", func.clock_timestamp() - ProviderRateBudget.updated_at),
                )
                .where(ProviderRateBudget.provider == provider)
                .with_for_update()
            )
        ).one()
        tokens, elapsed = float(row[0]), max(0.0, float(row[1]))
        available = min(capacity, tokens + rate * elapsed)
        granted = max(0, min(wanted, int(available)))
        await session.execute(
            update(ProviderRateBudget)
            .where(ProviderRateBudget.provider == provider)
            .values(tokens=available - granted, updated_at=func.clock_timestamp())
        )
    return granted


async def refund(
    sessionmaker: async_sessionmaker[AsyncSession], provider: str, unused: int, rate: float
) -> None:
    if unused <= 0:
        return
    async with sessionmaker() as session, session.begin():
        await session.execute(
            update(ProviderRateBudget)
            .where(ProviderRateBudget.provider == provider)
            .values(tokens=func.least(capacity_for(rate), ProviderRateBudget.tokens + unused))
        )
