"""The job state machine, on the real PostgreSQL database."""

from __future__ import annotations

import uuid

import pytest

from models import jobs
from models.db import Database
from models.tables import Job, JobState


@pytest.fixture
def database(postgres_url):  # type: ignore[no-untyped-def]
    database = Database(postgres_url)
    yield database
    database.dispose()


def new_job(database: Database) -> str:
    job_id = str(uuid.uuid4())
    with database.session() as session:
        session.add(Job(id=job_id, mode="txt2img", params={}, seed=1, width=256, height=256,
                        num_inference_steps=1, num_images=1))
    return job_id


def test_queued_running_succeeded(database):
    job_id = new_job(database)
    with database.session() as session:
        job = jobs.start(session, job_id, "w1", "tiny")
        assert job is not None and job.state == "running" and job.attempts == 1 and job.started_at
    with database.session() as session:
        job = jobs.succeed(session, job_id, [])
        assert job.state == "succeeded" and job.finished_at
    with database.session() as session:
        assert jobs.start(session, job_id, "w2", "tiny") is None  # a redelivery of a finished job is skipped


def test_redelivery_of_a_running_job_is_a_new_attempt(database):
    job_id = new_job(database)
    for attempt in (1, 2):
        with database.session() as session:
            assert jobs.start(session, job_id, f"w{attempt}", "tiny").attempts == attempt


def test_illegal_transitions(database):
    job_id = new_job(database)
    with database.session() as session:
        with pytest.raises(jobs.IllegalTransition, match="is queued: it cannot become succeeded"):
            jobs.succeed(session, job_id, [])
    with database.session() as session:
        jobs.cancel(session, job_id)
    with database.session() as session:
        with pytest.raises(jobs.IllegalTransition, match="is cancelled"):
            jobs.cancel(session, job_id)
        assert jobs.start(session, job_id, "w", "tiny") is None


def test_terminal_states():
    assert {s for s in JobState if s.terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
