"""Editor signals: which client and file a completion came from, views, partial accepts, what the user kept,
a no-code privacy setting per user, an ignored decision, and an audit trail of staff actions.

- completions: client (openai | tabby | continue | simulated), filepath, git_url, viewed_at (first view event),
  kept_text / kept_source (typed | derived | simulated) / kept_at, status (pending | served | disconnected |
  failed: the row is written before the first byte is sent and completed afterwards);
- feedback_events: accepted_chars (a partial accept: characters taken; NULL = the whole suggestion);
  the kind gains 'ignored' (shown, then neither accepted nor dismissed in time);
- users: store_code (false: counts, ids and hashes only, no code text, like Continue's noCode level);
- audit_events: who did what to which target, when (promotions and retirements from the console or CLI).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

OLD_KINDS = ('accepted', 'rejected')
NEW_KINDS = ('accepted', 'rejected', 'ignored')


def _kind(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name='feedback_kind', native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client', sa.String(length=16), nullable=False, server_default='openai'))
        batch_op.add_column(sa.Column('filepath', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('git_url', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('viewed_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('kept_text', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('kept_source', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('kept_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('status', sa.String(length=16), nullable=False, server_default='served'))
        # kept_text derivation looks up a user's earlier requests for the same file
        batch_op.create_index('ix_completions_user_file_time', ['user_id', 'filepath', 'created_at'], unique=False)

    with op.batch_alter_table('feedback_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('accepted_chars', sa.Integer(), nullable=True))
        batch_op.alter_column('kind', existing_type=_kind(OLD_KINDS), type_=_kind(NEW_KINDS),
                              existing_nullable=False)

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('store_code', sa.Boolean(), nullable=False, server_default=sa.true()))

    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=256), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_audit_events_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_created_at'), ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_created_at'))
    op.drop_table('audit_events')

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('store_code')

    op.execute("DELETE FROM feedback_events WHERE kind = 'ignored'")
    with op.batch_alter_table('feedback_events', schema=None) as batch_op:
        batch_op.alter_column('kind', existing_type=_kind(NEW_KINDS), type_=_kind(OLD_KINDS),
                              existing_nullable=False)
        batch_op.drop_column('accepted_chars')

    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_index('ix_completions_user_file_time')
        for col in ('status', 'kept_at', 'kept_source', 'kept_text', 'viewed_at', 'git_url', 'filepath', 'client'):
            batch_op.drop_column(col)
