"""drop the two indexes another one starts with: ix_jobs_state (ix_jobs_state_lease) and
ix_images_job_id (uq_images_job_index); each job's claim and success wrote to them for nothing

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 09:40:00
"""

from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_job_id')


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_job_id', ['job_id'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_state', ['state'], unique=False)
