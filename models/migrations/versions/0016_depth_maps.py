"""jobs.depth_key, jobs.depth_sha256: a depth-to-image job's own depth map in storage, and its digest

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 10:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('depth_key', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('depth_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('depth_sha256')
        batch_op.drop_column('depth_key')
