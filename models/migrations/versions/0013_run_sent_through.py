"""runs.sent_through: the creation time of the newest batch of a run's rows whose messages were sent

A run's enqueue marked each batch of rows sent with an UPDATE of its 1,000 rows after their
messages went. Rows just written by COPY fill their pages, so each of those updates wrote a new
version of the row elsewhere and a new entry in every index of `jobs`: more than half the time of a
million-row enqueue. The run's row now says how far its batches were sent: rows of the run created
after it, still queued, were written but not sent (the next enqueue sends them).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 12:10:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sent_through', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('sent_through')
