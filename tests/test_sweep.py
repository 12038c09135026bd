"""The sweeper against the real Redis, PostgreSQL and S3: expired leases, lost messages, orphan objects."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import redis
from sqlalchemy import select, update

from models import broker, jobs
from models.storage import object_key_for
from models.sweep import Sweeper
from models.tables import Job, Upload, utcnow
from tests.conftest import small

TIMEOUT = 180


def sweeper(client, sent: list[str], **overrides):  # type: ignore[no-untyped-def]
    from models.settings import load_settings

    return Sweeper(load_settings(**overrides), client.db, client.storage,
                   lambda job_ids, queue: sent.extend((job_id, queue) for job_id in job_ids))


def age(client, job_id: str, seconds: float, **columns) -> None:  # type: ignore[no-untyped-def]
    """Move a job's times `seconds` into the past (its message sent, its lease expired)."""
    past = utcnow() - timedelta(seconds=seconds)
    with client.db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            enqueued_at=past, **{name: past for name in columns}))


def test_expired_leases_go_back_to_the_queue_and_run(settings, client, worker):
    from models.settings import load_settings
    from producer.client import Client

    # a job claimed by a worker that died: its lease lapses (sent where no worker listens, so
    # that only the sweeper can bring it back)
    elsewhere = Client(load_settings(queue=f"{settings.queue}-nobody"))
    ghost_id = elsewhere.submit(small(prompt="a ghost ship", seed=9, num_inference_steps=2))
    elsewhere.close()
    with client.db.session() as session:
        session.execute(update(Job).where(Job.id == ghost_id).values(
            state="running", lease_owner="dead-worker", lease_token=1, attempts=1,
            lease_expires_at=utcnow() - timedelta(seconds=5)))
    sent: list[str] = []
    report = sweeper(client, sent).sweep()
    # (with what earlier tests left behind: the database is the session's)
    assert ghost_id in report.expired and (ghost_id, f"{settings.queue}-nobody") in sent  # to its own queue
    assert client.get(ghost_id)["state"] == "queued"
    client.send([ghost_id])  # what a sweeper sends, to this test's queue where the worker listens
    record = client.wait(ghost_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded" and record["attempts"] == 2 and record["failures"] == 0
    assert record["images"][0]["key"] == object_key_for(ghost_id, 0, 2)


def test_queued_jobs_whose_message_was_lost_are_sent_again(settings, client):
    lost, kept, fresh = (client.submit(small(prompt=f"job {i}")) for i in range(3))
    r = redis.Redis.from_url(settings.broker_url)
    messages = r.lrange(settings.queue, 0, -1)
    assert len(messages) == 3
    assert broker.live_job_ids(settings, settings.queue) >= {lost, kept, fresh}
    # the broker loses `lost`'s message (e.g. Redis restarted empty after it was sent)
    r.delete(settings.queue)
    r.lpush(settings.queue, *[m for m in messages if lost.encode() not in m])
    r.close()
    for job_id in (lost, kept):
        age(client, job_id, 3600)
    sent: list[str] = []
    report = sweeper(client, sent, requeue_after=60).sweep()
    assert lost in report.resent and (lost, settings.queue) in sent
    assert kept not in report.resent and fresh not in report.resent  # `fresh` has not waited long enough
    with client.db.session() as session:
        assert jobs.get_job(session, lost).enqueued_at > utcnow() - timedelta(seconds=60)
    # a second sweeper right after finds nothing to do: the job was marked as sent
    assert lost not in sweeper(client, [], requeue_after=60).sweep(force_scan=True).resent


def test_objects_no_job_references_are_deleted_after_the_grace(settings, client):
    cancelled = client.submit(small(prompt="never mind"))
    running = client.submit(small(prompt="still going"))
    with client.db.session() as session:
        job, _ = jobs.claim(session, running, "w1", "tiny", lease_seconds=60, max_attempts=3)
        lease = jobs.lease_of(job)
    client.cancel(cancelled)
    orphan, live = object_key_for(cancelled, 0, 1), object_key_for(running, 0, lease.token)
    with client.db.session() as session:
        session.add(Upload(object_key=orphan, job_id=cancelled, lease_token=1))
        jobs.record_uploads(session, lease, [live])
    for key in (orphan, live):
        client.storage.put(key, b"png")
    assert sweeper(client, []).sweep().orphans == 0  # within the grace period (default 600 s)
    report = sweeper(client, []).sweep(orphan_grace=0)
    assert report.orphans == 1
    assert not client.storage.exists(orphan) and client.storage.exists(live)  # a running claim's upload stays
    with client.db.session() as session:
        assert [u.object_key for u in session.scalars(select(Upload).where(
            Upload.job_id.in_([cancelled, running])))] == [live]


def test_sweep_command(settings_env):
    result = subprocess.run([sys.executable, "-m", "producer.cli", "sweep", "--orphan-grace", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "expired lease(s) requeued" in result.stdout and "orphan object(s) deleted" in result.stdout


def test_a_message_taken_by_a_worker_that_died_before_claiming_is_sent_again(settings, client):
    import json
    import time

    taken, held = (client.submit(small(prompt=f"taken {i}")) for i in range(2))
    r = redis.Redis.from_url(settings.broker_url)
    try:
        # both messages taken by a worker (kombu moves them to `unacked`): `taken` 10 minutes ago by
        # a worker that died before claiming its job, `held` just now by a live one
        for job_id, when in ((taken, time.time() - 600), (held, time.time())):
            raw = next(m for m in r.lrange(settings.queue, 0, -1) if job_id.encode() in m)
            r.lrem(settings.queue, 1, raw)
            tag = f"tag-{job_id}"
            r.hset("unacked", tag, json.dumps([json.loads(raw), "", settings.queue]))
            r.zadd("unacked_index", {tag: when})
        live = broker.live_job_ids(settings, settings.queue)
        assert held in live and taken not in live
        for job_id in (taken, held):
            age(client, job_id, 3600)
        sent: list[str] = []
        report = sweeper(client, sent, requeue_after=60).sweep(force_scan=True)
        assert taken in report.resent and held not in report.resent
    finally:
        for job_id in (taken, held):
            r.hdel("unacked", f"tag-{job_id}")
            r.zrem("unacked_index", f"tag-{job_id}")
        r.close()
