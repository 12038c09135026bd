"""runs, and the priority class of every job

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('source', sa.String(length=1024), nullable=True),
    sa.Column('source_sha256', sa.String(length=64), nullable=True),
    sa.Column('defaults', sa.JSON(), nullable=False),
    sa.Column('priority', sa.String(length=16), nullable=False),
    sa.Column('schedule', sa.String(length=255), nullable=True),
    sa.Column('fire_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expected_jobs', sa.Integer(), nullable=True),
    sa.Column('sealed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_schedule'), ['schedule'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.String(length=16), nullable=False, server_default='interactive'))
        batch_op.add_column(sa.Column('run_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('run_key', sa.String(length=255), nullable=True))
        batch_op.create_foreign_key('fk_jobs_run_id_runs', 'runs', ['run_id'], ['id'])
        batch_op.create_index('ix_jobs_run_state', ['run_id', 'state'], unique=False)
        batch_op.create_unique_constraint('uq_jobs_run_key', ['run_id', 'run_key'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_jobs_run_key', type_='unique')
        batch_op.drop_index('ix_jobs_run_state')
        batch_op.drop_constraint('fk_jobs_run_id_runs', type_='foreignkey')
        for column in ('run_key', 'run_id', 'priority'):
            batch_op.drop_column(column)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_schedule'))
    op.drop_table('runs')
