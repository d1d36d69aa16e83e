"""api key change notifications

Revision ID: 6b1f0c2e9a41
Revises: 3d7c3fb0b337
Create Date: 2026-12-06 18:30:00.000000

Every API process keeps the keys it has checked in memory (app/auth/cache.py) while it
LISTENs on `tunegate_api_keys`; this trigger tells it, at commit, which key was revoked,
deleted or otherwise changed, however the change was made (API, CLI, plain SQL), and `*` when
the table is truncated. `last_used_at` updates do not notify.
"""

from collections.abc import Sequence

from alembic import op


revision: str = '6b1f0c2e9a41'
down_revision: str | Sequence[str] | None = '3d7c3fb0b337'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION tunegate_api_key_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('tunegate_api_keys', OLD.id);
            ELSIF NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
                OR NEW.scope IS DISTINCT FROM OLD.scope
                OR NEW.project_id IS DISTINCT FROM OLD.project_id
                OR NEW.key_hash IS DISTINCT FROM OLD.key_hash THEN
                PERFORM pg_notify('tunegate_api_keys', OLD.id);
            END IF;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON api_keys "
        "FOR EACH ROW EXECUTE FUNCTION tunegate_api_key_changed()"
    )
    op.execute(
        """
        CREATE FUNCTION tunegate_api_keys_truncated() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('tunegate_api_keys', '*');
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON api_keys "
        "FOR EACH STATEMENT EXECUTE FUNCTION tunegate_api_keys_truncated()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_truncated ON api_keys")
    op.execute("DROP FUNCTION tunegate_api_keys_truncated()")
    op.execute("DROP TRIGGER api_keys_changed ON api_keys")
    op.execute("DROP FUNCTION tunegate_api_key_changed()")
