"""what each image shared in a continuous loop: steps run, most and mean samples per model call

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 12:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('steps_run', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('shared_max', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('shared_mean', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_column('shared_mean')
        batch_op.drop_column('shared_max')
        batch_op.drop_column('steps_run')
