"""run_counts, run_count_changes, run_rates: each run's jobs and images by state as counters, kept by
triggers on `jobs`

`sdqueue runs show`, GET /v1/runs/NAME and the dashboard counted a run's jobs by state, and its
images of the last five minutes, at every read: in a run of a million jobs, 0.9 s and 1.4 s of
PostgreSQL each, while the run's workers used the same cores. Every statement that inserts,
updates or deletes jobs of a run now appends what it moved, by run and state, to
run_count_changes (a statement-level trigger with transition tables on PostgreSQL: one row per
run and state the statement touched; row triggers on SQLite). Appending takes no lock that another
writer waits on. models/counts.py folds the changes into run_counts and run_rates (the sweeper, at
every sweep) and reads counts in milliseconds.

The triggers and the backfill of run_counts are in one transaction with the trigger holding its
lock on `jobs`, so no write falls between them. A later migration that rebuilds `jobs` on SQLite
(batch_alter_table) drops its triggers: it must create them again (create_triggers below).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 14:10:00
"""

import sqlalchemy as sa
from alembic import op


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

COLUMNS = "run_id, state, jobs, images, bucket"

POSTGRESQL_FUNCTION = f"""
CREATE FUNCTION sdqueue_run_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at_bucket bigint := floor(extract(epoch FROM now()) / 10) * 10;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO run_count_changes ({COLUMNS})
        SELECT run_id, state, count(*), sum(num_images), at_bucket FROM new_rows
        WHERE run_id IS NOT NULL GROUP BY run_id, state;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO run_count_changes ({COLUMNS})
        SELECT run_id, state, -count(*), -sum(num_images), at_bucket FROM old_rows
        WHERE run_id IS NOT NULL GROUP BY run_id, state;
    ELSE
        INSERT INTO run_count_changes ({COLUMNS})
        SELECT run_id, state, sum(jobs), sum(images), at_bucket FROM (
            SELECT run_id, state, 1 AS jobs, num_images AS images FROM new_rows
            UNION ALL
            SELECT run_id, state, -1, -num_images FROM old_rows
        ) AS moved
        WHERE run_id IS NOT NULL GROUP BY run_id, state HAVING sum(jobs) <> 0 OR sum(images) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""

# A trigger with transition tables answers one event.
POSTGRESQL_TRIGGERS = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}

SQLITE_BUCKET = "CAST(strftime('%s', 'now') AS INTEGER) / 10 * 10"

SQLITE_TRIGGERS = {
    "insert": f"""AFTER INSERT ON jobs WHEN NEW.run_id IS NOT NULL BEGIN
        INSERT INTO run_count_changes ({COLUMNS}) VALUES (NEW.run_id, NEW.state, 1, NEW.num_images, {SQLITE_BUCKET});
    END""",
    "update": f"""AFTER UPDATE OF state, run_id, num_images ON jobs
    WHEN OLD.state IS NOT NEW.state OR OLD.run_id IS NOT NEW.run_id OR OLD.num_images IS NOT NEW.num_images BEGIN
        INSERT INTO run_count_changes ({COLUMNS})
        SELECT OLD.run_id, OLD.state, -1, -OLD.num_images, {SQLITE_BUCKET} WHERE OLD.run_id IS NOT NULL;
        INSERT INTO run_count_changes ({COLUMNS})
        SELECT NEW.run_id, NEW.state, 1, NEW.num_images, {SQLITE_BUCKET} WHERE NEW.run_id IS NOT NULL;
    END""",
    "delete": f"""AFTER DELETE ON jobs WHEN OLD.run_id IS NOT NULL BEGIN
        INSERT INTO run_count_changes ({COLUMNS}) VALUES (OLD.run_id, OLD.state, -1, -OLD.num_images, {SQLITE_BUCKET});
    END""",
}


def create_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRESQL_FUNCTION)
        for event, referencing in POSTGRESQL_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER jobs_run_counts_{event} AFTER {event.upper()} ON jobs {referencing} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION sdqueue_run_count_changes()")
    else:
        for event, body in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER jobs_run_counts_{event} {body}")


def drop_triggers() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for event in POSTGRESQL_TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS jobs_run_counts_{event}" + (" ON jobs" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS sdqueue_run_count_changes()")


def upgrade() -> None:
    op.create_table('run_counts',
                    sa.Column('run_id', sa.String(length=36), nullable=False),
                    sa.Column('state', sa.String(length=16), nullable=False),
                    sa.Column('jobs', sa.BigInteger(), nullable=False),
                    sa.Column('images', sa.BigInteger(), nullable=False),
                    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('run_id', 'state'))
    op.create_table('run_count_changes',
                    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
                              nullable=False),
                    sa.Column('run_id', sa.String(length=36), nullable=False),
                    sa.Column('state', sa.String(length=16), nullable=False),
                    sa.Column('jobs', sa.Integer(), nullable=False),
                    sa.Column('images', sa.Integer(), nullable=False),
                    sa.Column('bucket', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('id'))
    op.create_index('ix_run_count_changes_run_id', 'run_count_changes', ['run_id'], unique=False)
    op.create_table('run_rates',
                    sa.Column('run_id', sa.String(length=36), nullable=False),
                    sa.Column('bucket', sa.BigInteger(), nullable=False),
                    sa.Column('images', sa.BigInteger(), nullable=False),
                    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('run_id', 'bucket'))
    create_triggers()
    # What the jobs already written add up to. A run running through the upgrade reads a rate of
    # zero until its images of the next seconds are folded.
    op.execute("INSERT INTO run_counts (run_id, state, jobs, images) "
               "SELECT run_id, state, count(*), coalesce(sum(num_images), 0) FROM jobs "
               "WHERE run_id IS NOT NULL GROUP BY run_id, state")


def downgrade() -> None:
    drop_triggers()
    op.drop_table('run_rates')
    op.drop_index('ix_run_count_changes_run_id', table_name='run_count_changes')
    op.drop_table('run_count_changes')
    op.drop_table('run_counts')
