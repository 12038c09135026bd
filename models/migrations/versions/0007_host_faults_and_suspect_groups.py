"""on which workers a job failed (dead-lettered only after two), and the suspect group it runs with

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 21:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failed_on', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('suspect_group', sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('suspect_group')
        batch_op.drop_column('failed_on')
