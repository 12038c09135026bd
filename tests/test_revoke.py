"""A Celery revoke (Flower, `celery control revoke`, `app.control.revoke`) cancels the job as
`sdqueue cancel` does, against real Redis, PostgreSQL, S3 and workers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import pytest

from models.events import Subscription
from tests.conftest import BUCKET, gated_unet, interactive_queue, small, wait_for
from tests.servers import s3_client, stop_process_group

TIMEOUT = 240
REVOKED = "revoked through Celery (control revoke)"
GATE_AFTER = 2


@pytest.fixture
def clean_broker(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Nothing of this test's queue is left in the shared Redis database: messages, kombu's
    bindings, the workers' registry and turns (every such key names the queue)."""
    yield
    from models.broker import redis_client

    redis = redis_client(settings)
    keys = list(redis.scan_iter(match=f"*{settings.queue}*", count=1000))
    if keys:
        redis.delete(*keys)
    redis.close()


def revoke_until(client, job_id: str, done, timeout: float = TIMEOUT, **options):  # type: ignore[no-untyped-def]
    """Broadcast a revoke of `job_id` as Flower does, again every few seconds (a worker that has
    just started may not be listening to broadcasts yet), until `done()` gives something true."""
    deadline = time.monotonic() + timeout
    while True:
        client.sender.control.revoke(job_id, **options)
        try:
            return wait_for(done, timeout=min(5.0, deadline - time.monotonic()))
        except AssertionError:
            assert time.monotonic() < deadline, f"revoke of {job_id}: timed out"


def stored_keys(settings, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    prefix = settings.storage_url.removeprefix(f"s3://{BUCKET}/")
    listed = s3_client(settings.s3_endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/images/{job_id}/")
    return [o["Key"] for o in listed.get("Contents", [])]


def cancelled_by_revoke(client, job_id: str):  # type: ignore[no-untyped-def]
    record = client.get(job_id)
    return record if record["state"] == "cancelled" else None


@contextmanager
def listening_worker(settings, queue: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """A real Celery worker (in this process, through worker.app.configure as every worker) that
    consumes `queue` only: it hears broadcasts but takes none of the test's jobs."""
    from celery.contrib.testing.worker import start_worker

    from worker.app import configure

    app = configure(settings)
    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=60,
                      queues=[queue]):
        yield


def start_sdqueue_worker(tmp_path):  # type: ignore[no-untyped-def]
    log = open(tmp_path / "later-worker.log", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log


def test_a_revoked_queued_job_is_cancelled_and_no_worker_started_later_runs_it(settings, client, clean_broker,
                                                                               tmp_path):
    import redis
    from celery.worker.state import revoked
    from sqlalchemy import update

    from models.sweep import Sweeper, SweepReport
    from models.tables import Job, utcnow

    # 1. a queued job whose queue no worker consumes yet; a worker of the deployment runs elsewhere
    job_id = client.submit(small(prompt="a revoked harbour", num_inference_steps=2, seed=5))
    with listening_worker(settings, f"{settings.queue}.elsewhere"):
        record = revoke_until(client, job_id, lambda: cancelled_by_revoke(client, job_id))
        assert job_id in revoked  # Celery's own revoke ran too
    assert record["error"] == REVOKED and record["attempts"] == 0 and record["images"] == []
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        assert broker.llen(interactive_queue(settings)) == 1  # its message still waits: the database decides below
        # 2. a worker started later (a new process: Celery's revoked set is empty) takes the message
        #    and drops it, since the job is cancelled; a job sent after it runs
        proc, log = start_sdqueue_worker(tmp_path)
        try:
            after_id = client.submit(small(prompt="a harbour at dawn", num_inference_steps=2, seed=6))
            after = client.wait(after_id, timeout=TIMEOUT)
            assert after["state"] == "succeeded", (tmp_path / "later-worker.log").read_text()[-3000:]
            wait_for(lambda: f"job {job_id} not run: it is cancelled" in (tmp_path / "later-worker.log").read_text(),
                     timeout=TIMEOUT)
            wait_for(lambda: broker.llen(interactive_queue(settings)) == 0 and not any(
                job_id.encode() in raw for raw in broker.hvals("unacked")), timeout=TIMEOUT)
        finally:
            stop_process_group(proc, timeout=60)
            log.close()
    finally:
        broker.close()
    record = client.get(job_id)
    assert record["state"] == "cancelled" and record["error"] == REVOKED
    assert record["attempts"] == 0 and record["started_at"] is None and record["images"] == []
    # 3. the sweeper never sends it again: its message is gone and it waited long, but it is cancelled
    with client.db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    sent: list[str] = []
    report = SweepReport()
    Sweeper(settings, client.db, client.storage, lambda ids, queue: sent.extend(ids)).resend_lost(report, force=True)
    assert job_id not in sent and job_id not in report.resent


@pytest.mark.parametrize("terminate", [False, True])  # Flower's "revoke" and "terminate"
def test_a_revoked_running_job_leaves_its_loop_and_records_nothing(settings, client, clean_broker, worker, caplog,
                                                                    terminate):
    from celery.worker.state import revoked

    caplog.set_level(logging.INFO, logger="worker.leases")
    steps = 40
    with gated_unet(GATE_AFTER, TIMEOUT) as (gate, calls):
        job_id = client.submit(small(prompt="a revoked lighthouse", num_inference_steps=steps, seed=7))
        wait_for(lambda: len(calls) > GATE_AFTER, timeout=TIMEOUT)  # denoising, held at a step
        assert client.get(job_id)["state"] == "running"
        with Subscription(client.settings, [job_id]) as events:
            # (Celery's terminate raises on the thread pool, which cannot kill a task: the job is cancelled still)
            record = revoke_until(client, job_id, lambda: cancelled_by_revoke(client, job_id), terminate=terminate)
            wait_for(lambda: (events.get(timeout=1) or {}).get("state") == "cancelled", timeout=TIMEOUT)  # waiters hear
        assert record["error"] == REVOKED and job_id in revoked  # and Celery's own revoke ran
        # the worker holding it heard the cancel announced and found the job no longer its own
        wait_for(lambda: any(job_id in r.getMessage() and "no longer held" in r.getMessage() for r in caplog.records),
                 timeout=TIMEOUT)
        gate.set()
        # the worker carries on: a job sent after it runs (2 images: 4 rows a call, 6 beside the revoked one)
        after = client.wait(client.submit(small(prompt="a lighthouse at noon", num_images=2, seed=8)),
                            timeout=TIMEOUT)
        assert after["state"] == "succeeded"
    revoked_calls = sum(rows in (2, 6) for rows in calls)
    assert revoked_calls <= GATE_AFTER + 3, calls  # it left its loop within a step or two of the release
    time.sleep(1.0)  # a late record would show here
    record = client.get(job_id)
    assert record["state"] == "cancelled" and record["error"] == REVOKED and record["images"] == []
    assert stored_keys(settings, job_id) == []  # none of its images was uploaded


def test_a_revoke_leaves_ended_and_unknown_jobs_alone(settings, client, clean_broker):
    """What each worker does with the ids of a revoke it hears (called here directly, no broadcast)."""
    from worker.revokes import cancel_revoked

    by_sdqueue, by_revoke = (client.submit(small(prompt=f"job {i}", seed=i)) for i in range(2))
    assert client.cancel(by_sdqueue)["error"] is None  # `sdqueue cancel` records no reason
    unknown = str(uuid.uuid4())
    cancel_revoked(settings, [by_sdqueue, unknown, by_revoke, "not-a-job-id"], REVOKED)  # raises nothing
    assert client.get(by_sdqueue)["state"] == "cancelled" and client.get(by_sdqueue)["error"] is None
    assert client.get(by_revoke)["state"] == "cancelled" and client.get(by_revoke)["error"] == REVOKED
    cancel_revoked(settings, [by_revoke], "revoked again")  # a second worker that heard it: harmless
    assert client.get(by_revoke)["error"] == REVOKED
