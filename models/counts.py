"""Each run's jobs and images by state, and its images of the last minutes, read from counters.

Counting a run's jobs at every read cost PostgreSQL about a second per million jobs, and a reader
of a running run reads it every few seconds. Triggers on `jobs` (migration 0014) append to
run_count_changes what each statement moved, by run and state: jobs and images into a state
(positive) or out of it (negative), stamped with the time down to ten seconds. Appending takes no
lock another writer waits on, so workers finishing jobs of one run never queue on a counter row.

fold() moves the changes into run_counts (one row per run and state) and the images that entered
`succeeded` into run_rates (one row per run and ten seconds); the sweeper folds at every sweep. A
reader adds the changes not folded yet to what was folded, so a count is exact whenever it is read,
folded or not. Each change is folded once: a fold takes its changes by deleting them, and a second
fold at the same moment waits for those rows and finds them gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from models.db import Database, dialect_insert
from models.tables import STATES, JobState, Run, RunCount, RunCountChange, RunRate

# The triggers on `jobs` that write the changes (migration 0014).
TRIGGERS = ("jobs_run_counts_insert", "jobs_run_counts_update", "jobs_run_counts_delete")
# Seconds a change's time is rounded down to, as the triggers do.
BUCKET = 10
# run_rates keeps this much of the past: the longest window a rate is read over.
RATES_KEPT = 3600.0
# Changes folded per transaction.
FOLD_BATCH = 10_000


@dataclass
class Counts:
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))  # images asked, by job state
    recent_images: int = 0  # images of jobs that succeeded within the window
    # The seconds those were counted over: the window's whole buckets, or, for a run that began
    # making images within it, from the first bucket that had any (its rate since then).
    window: float = 0.0


def read_counts(session: Session, run_ids: Iterable[str], window: float, now: float | None = None) -> dict[str, Counts]:
    """The runs' counts by state and their images that succeeded in the last `window` seconds (at
    most RATES_KEPT), counted in whole ten-second buckets."""
    ids = list(run_ids)
    found = {run_id: Counts() for run_id in ids}
    if not ids:
        return found
    now = time.time() if now is None else now
    since = (int(now - min(window, RATES_KEPT)) // BUCKET + 1) * BUCKET
    folded = select(RunCount.run_id, RunCount.state, RunCount.jobs, RunCount.images).where(RunCount.run_id.in_(ids))
    pending = (select(RunCountChange.run_id, RunCountChange.state, func.sum(RunCountChange.jobs),
                      func.sum(RunCountChange.images))
               .where(RunCountChange.run_id.in_(ids)).group_by(RunCountChange.run_id, RunCountChange.state))
    for query in (folded, pending):
        for run_id, state, jobs, images in session.execute(query):
            counts = found[run_id]
            counts.jobs[state] = counts.jobs.get(state, 0) + int(jobs or 0)
            counts.images[state] = counts.images.get(state, 0) + int(images or 0)
    rates = select(RunRate.run_id, RunRate.bucket, RunRate.images).where(RunRate.run_id.in_(ids), RunRate.bucket >= since)
    pending_rates = (select(RunCountChange.run_id, RunCountChange.bucket, RunCountChange.images)
                     .where(RunCountChange.run_id.in_(ids), RunCountChange.state == JobState.SUCCEEDED.value,
                            RunCountChange.images > 0, RunCountChange.bucket >= since))
    first = dict.fromkeys(ids, now)
    for query in (rates, pending_rates):
        for run_id, bucket, images in session.execute(query):
            found[run_id].recent_images += int(images)
            first[run_id] = min(first[run_id], bucket)
    for run_id, counts in found.items():
        counts.window = now - (since if counts.recent_images == 0 else first[run_id])
    return found


def fold(db: Database) -> int:
    """Move the changes written so far into run_counts and run_rates, FOLD_BATCH per transaction,
    and drop rates older than RATES_KEPT; returns the changes folded. Safe beside other folds and
    beside every writer of `jobs`."""
    folded = 0
    while True:
        with db.session() as session:
            taken = _take(session)
            if taken:
                _add(session, taken)
            if len(taken) < FOLD_BATCH:
                session.execute(delete(RunRate).where(RunRate.bucket < time.time() - RATES_KEPT - BUCKET))
        folded += len(taken)
        if len(taken) < FOLD_BATCH:
            return folded


def _take(session: Session) -> list[tuple[str, str, int, int, int]]:
    """Delete the oldest changes, returning them: these are this transaction's to fold. A fold
    beside it that took them first has them deleted, so this one gets none of those."""
    oldest = select(RunCountChange.id).order_by(RunCountChange.id).limit(FOLD_BATCH)
    taken = delete(RunCountChange).where(RunCountChange.id.in_(oldest.scalar_subquery())).returning(
        RunCountChange.run_id, RunCountChange.state, RunCountChange.jobs, RunCountChange.images, RunCountChange.bucket)
    return [tuple(row) for row in session.execute(taken)]  # type: ignore[misc]


def _add(session: Session, taken: list[tuple[str, str, int, int, int]]) -> None:
    """Add the changes to the counters of their runs that still exist (a deleted run's jobs leave
    changes behind), in the order of the counters' keys: two folds at once lock rows in the same
    order, so neither waits on the other in a circle."""
    counts: dict[tuple[str, str], list[int]] = {}
    rates: dict[tuple[str, int], int] = {}
    for run_id, state, jobs, images, bucket in taken:
        total = counts.setdefault((run_id, state), [0, 0])
        total[0] += jobs
        total[1] += images
        if state == JobState.SUCCEEDED.value and images > 0:
            rates[(run_id, bucket)] = rates.get((run_id, bucket), 0) + images
    runs = set(session.scalars(select(Run.id).where(Run.id.in_({run_id for run_id, _ in counts}))))
    rows = [{"run_id": run_id, "state": state, "jobs": jobs, "images": images}
            for (run_id, state), (jobs, images) in sorted(counts.items()) if run_id in runs and (jobs or images)]
    if rows:
        insert = dialect_insert(session, RunCount)
        session.execute(insert.values(rows).on_conflict_do_update(
            index_elements=[RunCount.run_id, RunCount.state],
            set_={"jobs": RunCount.jobs + insert.excluded.jobs, "images": RunCount.images + insert.excluded.images}))
    rows = [{"run_id": run_id, "bucket": bucket, "images": images}
            for (run_id, bucket), images in sorted(rates.items()) if run_id in runs]
    if rows:
        insert = dialect_insert(session, RunRate)
        session.execute(insert.values(rows).on_conflict_do_update(
            index_elements=[RunRate.run_id, RunRate.bucket], set_={"images": RunRate.images + insert.excluded.images}))
