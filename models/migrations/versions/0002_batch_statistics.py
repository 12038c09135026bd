"""batch statistics

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 05:37:05.264272
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('compat_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('jobs', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('seconds', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('peak_memory_bytes', sa.BigInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('peak_memory_bytes')
        batch_op.drop_column('seconds')
        batch_op.drop_column('jobs')
        batch_op.drop_column('compat_key')

