"""jobs.mask_key, jobs.mask_sha256: an inpainting job's mask in storage, and its digest

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 21:00:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mask_key', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('mask_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('mask_sha256')
        batch_op.drop_column('mask_key')
