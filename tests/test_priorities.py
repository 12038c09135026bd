"""Priorities through Redis and a batching worker: an interactive job overtakes a deep bulk queue,
and bulk jobs keep finishing under a flood of interactive ones.

Two mechanisms share the work, and which one shows depends on the worker's slots (jobs held):
- what is fetched: the worker consumes the interactive and the bulk queue, and kombu's Redis
  transport moves the queue it just took a message from to the end of its list, so while both
  hold messages every other fetch takes from each;
- what runs: among the jobs held, the batcher puts interactive work first, but while bulk work
  waits, every `bulk_share`-th batch goes by age alone.
Batches of two images (the pixel budget) make the order visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pytest
from sqlalchemy import select

from models import jobs
from models.tables import Batch, Image, Job, JobState
from tests.conftest import small, wait_for

TIMEOUT = 120


@pytest.fixture
def settings(settings_env, monkeypatch, request):  # type: ignore[no-untyped-def]
    """Window batching (its batches are what these tests read; tests/test_continuous.py checks
    the continuous loops' priorities), two 256x256 images a batch, the default bulk share; the
    worker slots as the test's parameter. The stand-in GPU: the order of batches is the engine's,
    whatever denoises (a batch of one step takes it about 0.3 s, as the tiny model on a CPU)."""
    from models.settings import load_settings

    monkeypatch.setenv("SDQUEUE_MODEL", "standin")
    monkeypatch.setenv("SDQUEUE_STANDIN_SCALE", "20")

    monkeypatch.setenv("SDQUEUE_BATCHING", "window")
    monkeypatch.setenv("SDQUEUE_PIXEL_BUDGET", str(2 * 256 * 256))
    monkeypatch.setenv("SDQUEUE_BATCH_WINDOW_MS", "20")
    monkeypatch.setenv("SDQUEUE_WORKER_SLOTS", str(request.param))
    monkeypatch.setenv("SDQUEUE_BULK_SHARE", "4")
    return load_settings()


def cheap(prompt: str, seed: int, steps: int = 1) -> dict:
    return small(prompt=prompt, seed=seed, num_inference_steps=steps)


@dataclass
class Ran:
    """One batch the worker ran: when it started, and the priorities of its jobs."""

    id: str
    started_at: datetime
    priorities: list[str]

    @property
    def bulk_led(self) -> bool:
        return self.priorities[0] == "bulk"


def timeline(client, worker: str) -> list[Ran]:  # type: ignore[no-untyped-def]
    """The batches of `worker` whose images are recorded, in the order they ran."""
    batches: dict[str, Ran] = {}
    with client.db.session() as session:
        rows = session.execute(
            select(Batch.id, Batch.started_at, Job.priority)
            .join(Image, Image.batch_id == Batch.id).join(Job, Job.id == Image.job_id)
            .where(Batch.worker == worker).order_by(Batch.started_at, Image.batch_position)
        ).all()
    for batch_id, started_at, priority in rows:
        batches.setdefault(batch_id, Ran(batch_id, started_at, [])).priorities.append(priority)
    return list(batches.values())


def finished(client, job_ids: list[str]) -> dict[str, datetime]:  # type: ignore[no-untyped-def]
    """When each job of `job_ids` that has succeeded finished."""
    with client.db.session() as session:
        return dict(session.execute(
            select(Job.id, Job.finished_at).where(Job.id.in_(job_ids), Job.state == JobState.SUCCEEDED.value)).all())


@pytest.mark.parametrize("settings", [8], indirect=True)
def test_an_interactive_job_overtakes_a_deep_bulk_queue(settings, client, worker):
    """8 slots hold four batches' worth of jobs: the interactive job's message is among the next
    two fetched (the queues alternate), and the batcher puts it in the next batch it plans; in
    age order it would wait for all 200 bulk jobs (about 100 batches)."""
    from worker.tasks import generate

    hostname = generate.context.engine.hostname
    bulk_ids = [client.submit(cheap(f"a field {i}", i), priority="bulk") for i in range(200)]
    try:
        wait_for(lambda: len(finished(client, bulk_ids)) >= 6, timeout=TIMEOUT)  # the worker is busy with bulk
        job_id = client.submit(cheap("a lighthouse", 7))
        record = client.wait(job_id, timeout=TIMEOUT)
        assert record["state"] == "succeeded", record["error"]
        with client.db.session() as session:
            job = session.get(Job, job_id)
            submitted, done = job.created_at, job.finished_at
        batch_id = record["images"][0]["batch_id"]
        after = wait_for(lambda: [b for b in timeline(client, hostname) if b.started_at > submitted], timeout=TIMEOUT)
        position = [b.id for b in after].index(batch_id) + 1
        assert position <= 3, f"it ran in the {position}th batch after it was submitted"
        # it led its batch: interactive work is planned first (bulk of the same shape fills the rest)
        assert next(b for b in after if b.id == batch_id).priorities[0] == "interactive"
        assert sum(t < done for t in finished(client, bulk_ids).values()) < 30  # of 200
    finally:
        cancel_queued(client, bulk_ids)  # the rest: later sweepers need not look at them


def cancel_queued(client, job_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    with client.db.session() as session:
        for job in session.scalars(select(Job).where(Job.id.in_(job_ids), Job.state == JobState.QUEUED.value)):
            jobs.cancel(session, job.id)


@pytest.mark.parametrize("settings", [8, 32], indirect=True)
def test_bulk_keeps_finishing_under_an_interactive_flood(settings, client, request):
    """8 bulk jobs, then a flood of 48 interactive ones of another shape (none share a batch), are
    queued before the worker starts: it fetches from both queues in turn until the bulk one is
    empty, then interactive jobs only. Without bulk's share of the batches (bulk_share=1000),
    the bulk jobs waited for the end of the flood: with 32 slots 24 interactive batches ran first;
    with 8 the slots filled with bulk jobs, and the flood ran one job a batch beside them."""
    bulk_ids = [client.submit(cheap(f"a field {i}", i), priority="bulk") for i in range(8)]
    flood = [client.submit(cheap(f"a lighthouse {i}", 100 + i, steps=2)) for i in range(48)]
    request.getfixturevalue("worker")  # starts now, with both queues full
    from worker.tasks import generate

    wait_for(lambda: len(finished(client, bulk_ids + flood)) == 56, timeout=TIMEOUT, step=0.2)
    leaders = "".join("B" if b.bulk_led else "i" for b in timeline(client, generate.context.engine.hostname))
    assert leaders.count("B") == 4, leaders  # 8 bulk jobs, two a batch
    while_bulk_waited = leaders[: leaders.rindex("B")]
    # 3 (bulk_share - 1) interactive batches, then bulk's turn; one more at the start, planned
    # before any bulk job was claimed
    assert max(len(run) for run in while_bulk_waited.split("B")) <= 4, leaders
    assert len(leaders) - len(while_bulk_waited) > 8, leaders  # of the flood's 24 batches, 9 or more ran after
