"""Covering indexes for acceptance counting (the web console's pages and `ownllm feedback report`).

With 100k completions, counting a time window's decisions per version x language read each completion of
the window through the table (an index lookup then a row lookup); an A/B experiment's arms scanned all
completions of each arm's version. These indexes hold every completion column those queries read:
- completions(created_at, model_version_id, language, user_id, viewed_at): a window, also per user, with the
  view time that decides whether an undecided completion counts as ignored;
- completions(experiment_id, model_version_id, created_at, user_id, viewed_at): an experiment's arms and users.
(A covering feedback_events(completion_id, kind) was tried and dropped: neither database used it.)
Measured by benchmarks/bench_console.py (docs/BENCHMARKS.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.create_index('ix_completions_time_version_lang_user',
                              ['created_at', 'model_version_id', 'language', 'user_id', 'viewed_at'], unique=False)
        batch_op.create_index('ix_completions_experiment_version_time',
                              ['experiment_id', 'model_version_id', 'created_at', 'user_id', 'viewed_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('completions', schema=None) as batch_op:
        batch_op.drop_index('ix_completions_experiment_version_time')
        batch_op.drop_index('ix_completions_time_version_lang_user')
