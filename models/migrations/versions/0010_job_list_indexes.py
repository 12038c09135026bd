"""newest-first job lists paged by (created_at, id): all jobs, a key's, a run's

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 04:00:00
"""

from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_created', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_key_created', ['api_key_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_run_created', ['run_id', 'created_at', 'id'], unique=False)
        batch_op.drop_index('ix_jobs_api_key_id')  # the key's new index starts with its column


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_api_key_id', ['api_key_id'], unique=False)
        batch_op.drop_index('ix_jobs_run_created')
        batch_op.drop_index('ix_jobs_key_created')
        batch_op.drop_index('ix_jobs_created')
