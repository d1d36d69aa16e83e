from __future__ import annotations

import asyncio

from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.migrate import alembic_config, check_no_drift, current_revisions, migrations_dir


def test_one_head_and_date_stamped_revisions() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    for path in (migrations_dir() / "versions").glob("*.py"):
        stamp = path.name.split("_", 1)[0]
        assert stamp.isdigit() and len(stamp) == 8, f"{path.name} is not date-stamped"


async def test_database_is_at_head_and_models_do_not_drift(
    database_url: str, engine: AsyncEngine
) -> None:
    async with engine.connect() as conn:
        current = await current_revisions(conn)
    assert current == tuple(ScriptDirectory.from_config(alembic_config()).get_heads())
    # `alembic check`: autogenerate against the migrated schema must find nothing to do.
    await asyncio.to_thread(check_no_drift, database_url)
