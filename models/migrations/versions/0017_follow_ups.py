"""jobs.after_job_id, jobs.after_index: a follow-up job and the image of the job it follows

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 23:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('after_job_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('after_index', sa.Integer(), nullable=True))
        batch_op.create_index('ix_jobs_after_job_id', ['after_job_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_after_job_id')
        batch_op.drop_column('after_index')
        batch_op.drop_column('after_job_id')
