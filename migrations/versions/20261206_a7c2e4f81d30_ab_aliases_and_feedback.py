"""ab aliases and feedback

Revision ID: a7c2e4f81d30
Revises: 6b1f0c2e9a41
Create Date: 2026-12-06 20:00:00.000000

A/B on live traffic: an alias may split its traffic between models by weight
(`model_aliases.weights`), every usage record names the alias its request named
(`usage_records.alias`), and `feedback` holds what users thought of completions.
`usage_records.request_id` grows to 128 characters, the longest `x-request-id` a caller may
send: a longer one than 64 failed the whole batch of usage records it was in.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


revision: str = 'a7c2e4f81d30'
down_revision: str | Sequence[str] | None = '6b1f0c2e9a41'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        'model_aliases',
        sa.Column('weights', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column('usage_records', sa.Column('alias', sa.String(length=64), nullable=True))
    op.alter_column(
        'usage_records',
        'request_id',
        existing_type=sa.String(length=64),
        type_=sa.String(length=128),
        existing_nullable=True,
    )
    op.create_index(
        'ix_usage_records_project_id_alias_created_at',
        'usage_records',
        ['project_id', 'alias', 'created_at'],
        unique=False,
    )
    op.create_index(
        'ix_usage_records_project_id_request_id',
        'usage_records',
        ['project_id', 'request_id'],
        unique=False,
    )
    op.create_table('feedback',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('label', sa.String(length=64), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('score IS NOT NULL OR label IS NOT NULL', name=op.f('ck_feedback_score_or_label')),
    sa.CheckConstraint('score IS NULL OR (score >= -1 AND score <= 1)', name=op.f('ck_feedback_score_range')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_feedback_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback'))
    )
    op.create_index('ix_feedback_project_id_alias_created_at', 'feedback', ['project_id', 'alias', 'created_at'], unique=False)
    op.create_index('ix_feedback_project_id_request_id', 'feedback', ['project_id', 'request_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_feedback_project_id_request_id', table_name='feedback')
    op.drop_index('ix_feedback_project_id_alias_created_at', table_name='feedback')
    op.drop_table('feedback')
    op.drop_index('ix_usage_records_project_id_request_id', table_name='usage_records')
    op.drop_index('ix_usage_records_project_id_alias_created_at', table_name='usage_records')
    op.alter_column(
        'usage_records',
        'request_id',
        existing_type=sa.String(length=128),
        type_=sa.String(length=64),
        existing_nullable=True,
        postgresql_using='left(request_id, 64)',
    )
    op.drop_column('usage_records', 'alias')
    op.drop_column('model_aliases', 'weights')
