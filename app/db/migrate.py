"""Alembic, driven from code: `tunegate migrate`, `serve`'s start-up, `/readyz` and the tests."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

FILE_TEMPLATE = "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s"


def migrations_dir() -> Path:
    """`TUNEGATE_MIGRATIONS_DIR`, else `migrations/` beside the `app` package (source tree)."""
    configured = os.environ.get("TUNEGATE_MIGRATIONS_DIR")
    candidates = [Path(configured)] if configured else []
    candidates += [Path(__file__).resolve().parents[2] / "migrations", Path.cwd() / "migrations"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(
        "cannot find the migrations directory; set TUNEGATE_MIGRATIONS_DIR to its path"
    )


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("file_template", FILE_TEMPLATE)
    if database_url is not None:
        # Passed through attributes, not the ini options, so '%' in passwords needs no escaping.
        config.attributes["database_url"] = database_url
    return config


def upgrade_to_head(database_url: str) -> None:
    """Apply every pending migration. Synchronous: run it in a thread from async code."""
    command.upgrade(alembic_config(database_url), "head")


def check_no_drift(database_url: str) -> None:
    """Raise if the models differ from what the migrations build (`alembic check`)."""
    command.check(alembic_config(database_url))


@lru_cache(maxsize=1)
def script_heads() -> tuple[str, ...]:
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


async def current_revisions(connection: AsyncConnection) -> tuple[str, ...]:
    exists = await connection.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    if not exists:
        return ()
    rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
    return tuple(sorted(row[0] for row in rows))


async def is_at_head(connection: AsyncConnection) -> bool:
    return await current_revisions(connection) == tuple(sorted(script_heads()))
