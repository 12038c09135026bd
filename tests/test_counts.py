"""Runs' counters (models/counts.py): what the triggers on `jobs` write, folded or not, always adds up
to counting the jobs themselves, on PostgreSQL and on SQLite, with folds and writers side by side."""

from __future__ import annotations

import random
import threading
import uuid

from sqlalchemy import delete, func, insert, select, update

from models import counts, jobs
from models.db import Database, upgrade
from models.tables import Job, JobState, Run, RunCount, RunCountChange, RunRate
from tests.conftest import POSTGRES_ADMIN_URL
from tests.servers import postgres_database


def new_run(database: Database) -> str:
    run_id = str(uuid.uuid4())
    with database.session() as session:
        session.add(Run(id=run_id, name=f"counted-{run_id}"))
    return run_id


def add_jobs(database: Database, run_id: str | None, images: list[int]) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in images]
    with database.session() as session:
        session.execute(insert(Job), [
            {"id": job_id, "run_id": run_id, "run_key": job_id if run_id else None, "mode": "txt2img", "params": {},
             "seed": 1, "width": 256, "height": 256, "num_inference_steps": 1, "num_images": n}
            for job_id, n in zip(ids, images)])
    return ids


def set_state(database: Database, ids: list[str], state: JobState) -> None:
    with database.session() as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(state=state.value))


def counted(database: Database, run_id: str) -> tuple[dict[str, int], dict[str, int], int]:
    """The run's jobs and images by state (states with none left out), and its recent images, from the counters."""
    with database.session() as session:
        found = counts.read_counts(session, [run_id], 300)[run_id]
    return ({s: n for s, n in found.jobs.items() if n}, {s: n for s, n in found.images.items() if n},
            found.recent_images)


def truth(database: Database, run_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """The same, counting the run's jobs."""
    with database.session() as session:
        rows = session.execute(select(Job.state, func.count(), func.sum(Job.num_images)).where(Job.run_id == run_id)
                               .group_by(Job.state)).all()
    return {state: n for state, n, _ in rows}, {state: int(images) for state, _, images in rows}


def pending(database: Database, run_id: str) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(RunCountChange).where(RunCountChange.run_id == run_id))


def assert_adds_up(database: Database, run_id: str) -> None:
    jobs_, images, _ = counted(database, run_id)
    assert (jobs_, images) == truth(database, run_id)


def test_every_change_of_a_runs_jobs_is_counted_folded_or_not(database, monkeypatch):
    monkeypatch.setattr(counts, "FOLD_BATCH", 3)  # several transactions in one fold
    run_id = new_run(database)
    other = new_run(database)
    ids = add_jobs(database, run_id, [1, 2, 1, 4, 1, 1, 1, 1])
    add_jobs(database, other, [1, 1])
    add_jobs(database, None, [3])  # a job of no run counts nowhere
    assert counted(database, run_id) == ({"queued": 8}, {"queued": 12}, 0)
    assert counted(database, other) == ({"queued": 2}, {"queued": 2}, 0)

    set_state(database, ids[:5], JobState.RUNNING)
    with database.session() as session:  # a lease renewal moves no job between states: no change written
        before = session.scalar(select(func.count()).select_from(RunCountChange))
        jobs.renew(session, "nobody", ids[:5], 30)
        session.execute(update(Job).where(Job.id.in_(ids[:5])).values(lease_owner="w1"))
        assert session.scalar(select(func.count()).select_from(RunCountChange)) == before
    assert_adds_up(database, run_id)

    assert counts.fold(database) >= 4
    assert pending(database, run_id) == 0
    assert_adds_up(database, run_id)

    set_state(database, ids[:3], JobState.SUCCEEDED)
    set_state(database, ids[3:4], JobState.FAILED)
    set_state(database, ids[5:6], JobState.CANCELLED)
    assert counted(database, run_id) == (
        {"queued": 2, "running": 1, "succeeded": 3, "failed": 1, "cancelled": 1},
        {"queued": 2, "running": 1, "succeeded": 4, "failed": 4, "cancelled": 1}, 4)  # 4 images succeeded just now
    counts.fold(database)
    assert counted(database, run_id)[2] == 4  # the rate, folded into run_rates
    with database.session() as session:
        session.execute(delete(Job).where(Job.id.in_(ids[6:])))
    set_state(database, ids[3:4], JobState.QUEUED)  # a retry
    assert_adds_up(database, run_id)
    counts.fold(database)
    assert_adds_up(database, run_id)
    assert counted(database, other) == ({"queued": 2}, {"queued": 2}, 0)


def test_a_deleted_runs_changes_are_dropped_with_its_counters(database):
    run_id = new_run(database)
    ids = add_jobs(database, run_id, [1, 1, 1])
    set_state(database, ids, JobState.SUCCEEDED)
    counts.fold(database)
    add_jobs(database, run_id, [1])
    with database.session() as session:  # as delete_run does: the jobs, then the run's row
        session.execute(delete(Job).where(Job.run_id == run_id))
        session.execute(delete(Run).where(Run.id == run_id))
    counts.fold(database)
    with database.session() as session:
        for table in (RunCount, RunRate, RunCountChange):
            assert session.scalar(select(func.count()).select_from(table).where(table.run_id == run_id)) == 0


def test_folds_beside_writers_count_each_change_once(postgres_url, monkeypatch):
    monkeypatch.setattr(counts, "FOLD_BATCH", 7)
    database = Database(postgres_url)
    try:
        run_id = new_run(database)
        ids = add_jobs(database, run_id, [1, 2, 3] * 20)
        states = list(JobState)
        stop = threading.Event()
        errors: list[BaseException] = []

        def write(seed: int) -> None:
            chance = random.Random(seed)
            try:
                for _ in range(150):
                    set_state(database, chance.sample(ids, chance.randint(1, 6)), chance.choice(states))
            except BaseException as exc:  # the test's own failure, reported below
                errors.append(exc)

        def fold() -> None:
            try:
                while not stop.is_set():
                    counts.fold(database)
            except BaseException as exc:
                errors.append(exc)

        writers = [threading.Thread(target=write, args=(seed,)) for seed in range(3)]
        folders = [threading.Thread(target=fold) for _ in range(3)]
        for thread in writers + folders:
            thread.start()
        for thread in writers:
            thread.join()
        stop.set()
        for thread in folders:
            thread.join()
        assert errors == []
        assert_adds_up(database, run_id)
        counts.fold(database)
        assert pending(database, run_id) == 0
        assert_adds_up(database, run_id)
    finally:
        database.dispose()


def test_the_upgrade_counts_the_jobs_already_there():
    from alembic import command

    from models.db import alembic_config

    with postgres_database(POSTGRES_ADMIN_URL) as url:
        command.upgrade(alembic_config(url), "0013")
        database = Database(url, check=False)
        try:
            run_id = new_run(database)
            ids = add_jobs(database, run_id, [1, 2, 3, 4])
            set_state(database, ids[:2], JobState.SUCCEEDED)
            upgrade(url)
            assert counted(database, run_id)[:2] == ({"queued": 2, "succeeded": 2}, {"queued": 7, "succeeded": 3})
            assert pending(database, run_id) == 0
        finally:
            database.dispose()
