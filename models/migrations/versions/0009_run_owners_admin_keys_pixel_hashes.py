"""runs belong to the API key that made them; admin keys; the sha256 of each image's pixels

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 03:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('api_key_id', sa.String(length=36), nullable=True))
        batch_op.create_index('ix_runs_api_key_id', ['api_key_id'], unique=False)
        batch_op.create_foreign_key('fk_runs_api_key_id_api_keys', 'api_keys', ['api_key_id'], ['id'])
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('admin', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pixel_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_column('pixel_sha256')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('admin')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_runs_api_key_id_api_keys', type_='foreignkey')
        batch_op.drop_index('ix_runs_api_key_id')
        batch_op.drop_column('api_key_id')
