"""leases, failures and dead letters, upload intents

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 06:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failures', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('dead_letter', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('lease_token', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('suspect', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('running_alone', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('queue', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_jobs_state_lease', ['state', 'lease_expires_at'], unique=False)

    op.create_table('uploads',
    sa.Column('object_key', sa.String(length=512), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('lease_token', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('object_key')
    )
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_uploads_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_uploads_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_uploads_job_id'))
        batch_op.drop_index(batch_op.f('ix_uploads_created_at'))
    op.drop_table('uploads')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_lease')
        for column in ('enqueued_at', 'queue', 'running_alone', 'suspect', 'lease_expires_at', 'lease_token', 'lease_owner',
                       'dead_letter', 'failures'):
            batch_op.drop_column(column)
