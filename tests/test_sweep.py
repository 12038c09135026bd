"""The sweeper against the real Redis, PostgreSQL and S3: expired leases, lost messages, orphan objects."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import psycopg
import pytest
import redis
from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from models import broker, jobs
from models.storage import object_key_for
from models.sweep import Sweeper, SweepReport
from models.tables import Job, Upload, utcnow
from models.workers import forget, list_workers, publish_status
from tests.conftest import interactive_queue, small, wait_for
from tests.servers import free_port

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
    assert ghost_id in report.expired and (ghost_id, f"{settings.queue}-nobody.tiny") in sent  # to its own queue
    assert client.get(ghost_id)["state"] == "queued"
    client.send([ghost_id])  # what a sweeper sends, to this test's queue where the worker listens
    record = client.wait(ghost_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded" and record["attempts"] == 2 and record["failures"] == 0
    assert record["images"][0]["key"] == object_key_for(ghost_id, 0, 2)


def test_queued_jobs_whose_message_was_lost_are_sent_again(settings, client):
    lost, kept, fresh = (client.submit(small(prompt=f"job {i}")) for i in range(3))
    r = redis.Redis.from_url(settings.broker_url)
    messages = r.lrange(interactive_queue(settings), 0, -1)
    assert len(messages) == 3
    assert broker.live_job_ids(settings, interactive_queue(settings)) >= {lost, kept, fresh}
    # the broker loses `lost`'s message (e.g. Redis restarted empty after it was sent)
    r.delete(interactive_queue(settings))
    r.lpush(interactive_queue(settings), *[m for m in messages if lost.encode() not in m])
    r.close()
    for job_id in (lost, kept):
        age(client, job_id, 3600)
    sent: list[str] = []
    report = sweeper(client, sent, requeue_after=60).sweep()
    assert lost in report.resent and (lost, interactive_queue(settings)) in sent
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
    assert report.orphans >= 1  # this test's, and any an earlier test of this session's database left
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
            raw = next(m for m in r.lrange(interactive_queue(settings), 0, -1) if job_id.encode() in m)
            r.lrem(interactive_queue(settings), 1, raw)
            tag = f"tag-{job_id}"
            r.hset("unacked", tag, json.dumps([json.loads(raw), "", interactive_queue(settings)]))
            r.zadd("unacked_index", {tag: when})
        live = broker.live_job_ids(settings, interactive_queue(settings))
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


# Leases that ran out while their worker lived (PostgreSQL down: heartbeats could not renew them).

def running_job(db, owner: str, settings) -> str:  # type: ignore[no-untyped-def]
    """A job row (no message sent) claimed by `owner`, whose lease expired 5 s ago."""
    from models.request import parse_request
    from producer.bulk import job_row

    values = job_row(parse_request(small(prompt=f"held by {owner}")), settings=settings, priority="interactive",
                     storage=None)  # type: ignore[arg-type]  (no input image: storage is not used)
    values.update(state="running", lease_owner=owner, lease_token=1, attempts=1, enqueued_at=utcnow(),
                  started_at=utcnow(), lease_expires_at=utcnow() - timedelta(seconds=5))
    with db.session() as session:
        session.add(Job(**values))
    return values["id"]


def state_of(db, job_id: str) -> str:  # type: ignore[no-untyped-def]
    with db.session() as session:
        return session.scalar(select(Job.state).where(Job.id == job_id))


def drop_jobs(db, *job_ids: str) -> None:  # type: ignore[no-untyped-def]
    with db.session() as session:
        session.execute(delete(Job).where(Job.id.in_(job_ids)))


def drop_queue(settings) -> None:  # type: ignore[no-untyped-def]
    """What sending this test's jobs left in Redis: its queues' lists and kombu's bindings."""
    r = redis.Redis.from_url(settings.broker_url)
    try:
        keys = list(r.scan_iter(match=f"*{settings.queue}*"))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def test_a_lease_whose_worker_still_publishes_its_status_is_not_taken(settings, client):
    owner = f"live-{uuid.uuid4().hex[:8]}"
    job_id = running_job(client.db, owner, settings)
    sent: list[str] = []
    try:
        # its worker lives (it publishes its status) but could not renew its lease
        assert publish_status(settings, {"name": owner}, ttl=60)
        report = SweepReport()
        sweeper(client, sent).requeue_expired(report)
        assert job_id not in report.expired and job_id not in report.dead_lettered
        assert state_of(client.db, job_id) == "running"
        # it dies: its last status expires, and then its lease is taken back
        assert publish_status(settings, {"name": owner}, ttl=1)
        wait_for(lambda: owner not in {status["name"] for status in list_workers(settings)}, timeout=60, step=0.2)
        report = SweepReport()
        sweeper(client, sent).requeue_expired(report)
        assert job_id in report.expired and (job_id, interactive_queue(settings)) in sent
        assert state_of(client.db, job_id) == "queued"
    finally:
        forget(settings, owner)
        drop_jobs(client.db, job_id)


def test_no_lease_is_taken_while_the_worker_registry_cannot_be_read(settings, client, caplog):
    job_id = running_job(client.db, f"dead-{uuid.uuid4().hex[:8]}", settings)
    sent: list[str] = []
    try:
        cut_off = sweeper(client, sent, broker_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        report = SweepReport()
        with caplog.at_level(logging.WARNING, logger="models.sweep"):
            cut_off.requeue_expired(report)
        assert not report.expired and not report.dead_lettered and not sent
        assert state_of(client.db, job_id) == "running"
        assert any("worker registry cannot be read" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        # the registry readable again, and its owner absent from it: taken back
        report = SweepReport()
        sweeper(client, sent).requeue_expired(report)
        assert job_id in report.expired
    finally:
        drop_jobs(client.db, job_id)


def test_with_the_in_process_broker_the_database_alone_decides(settings, client):
    owner = f"live-{uuid.uuid4().hex[:8]}"
    job_id = running_job(client.db, owner, settings)
    try:
        assert publish_status(settings, {"name": owner}, ttl=60)  # a registry the demo's sweeper has no access to
        report = SweepReport()
        sweeper(client, [], broker_url="memory://").requeue_expired(report)
        assert job_id in report.expired
    finally:
        forget(settings, owner)
        drop_jobs(client.db, job_id)


def test_a_sweeper_takes_no_lease_until_a_lease_after_the_database_came_back(settings):
    from models.db import Database
    from models.settings import load_settings
    from tests.conftest import POSTGRES_ADMIN_URL
    from tests.servers import postgres_database

    with postgres_database(POSTGRES_ADMIN_URL) as url:
        db = Database(url, check=False)  # expiry_wait asks the server, not the tables
        name = make_url(url).database
        admin = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            sw = Sweeper(load_settings(lease_seconds=4, heartbeat_seconds=1), db, None, lambda ids, queue: None)  # type: ignore[arg-type]
            assert sw.expiry_wait()[0] == 0  # no outage seen, and the server has been up for longer than a lease
            # the database goes away for this sweeper (its connections dropped, no new one taken) ...
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
            with pytest.raises(OperationalError):
                sw.expiry_wait()
            # ... and comes back: a whole lease to wait
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            left, why = sw.expiry_wait()
            assert left > 0 and "came back" in why, (left, why)
            heard: list[str] = []
            sw.settle(say=heard.append)
            assert sw.expiry_wait()[0] == 0
            assert len(heard) == 1 and heard[0].startswith("waiting ") and "came back" in heard[0]
        finally:
            db.dispose()


@pytest.fixture(scope="module")
def private_postgres(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A PostgreSQL server of this module's own, to restart, with the sdqueue schema in `sdqueue`."""
    from models.db import upgrade
    from tests.servers import PostgresServer

    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        url = server.create_database("sdqueue")
        upgrade(url)
        yield server, url


# Long enough that the command starts within it on a busy machine.
LEASE = 30  # the sweep command must start and connect well within it, on a loaded machine too


def sweep_command(url: str) -> subprocess.Popen:
    env = {**os.environ, "SDQUEUE_DATABASE_URL": url, "SDQUEUE_LEASE_SECONDS": str(LEASE)}
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "sweep"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def requeued_after_start(db, job_id: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds between the server's start and the job's requeue, by the one machine's clock."""
    with db.session() as session:
        started = session.scalar(text("SELECT pg_postmaster_start_time()"))
        updated = session.scalar(select(Job.updated_at).where(Job.id == job_id))
    return (jobs.aware(updated) - started).total_seconds()


def test_the_sweep_command_waits_a_lease_after_the_database_started(settings, private_postgres):
    from models.db import Database

    server, url = private_postgres
    db = Database(url)
    job_id = running_job(db, f"dead-{uuid.uuid4().hex[:8]}", settings)
    sweep: subprocess.Popen | None = None
    try:
        server.restart()  # a restart the sweep never saw (the CronJob starts after it)
        sweep = sweep_command(url)
        assert sweep.stdout is not None
        line = sweep.stdout.readline()
        assert line.startswith("waiting ") and "the database started" in line, line
        assert state_of(db, job_id) == "running"
        out, err = sweep.communicate(timeout=120)
        assert sweep.returncode == 0, err
        assert out.startswith("1 expired lease(s) requeued"), out
        assert state_of(db, job_id) == "queued"
        assert requeued_after_start(db, job_id) >= LEASE
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
        drop_jobs(db, job_id)
        db.dispose()
        drop_queue(settings)


def test_the_sweep_command_started_during_an_outage_waits_it_out_then_a_lease(settings, private_postgres):
    from models.db import Database

    server, url = private_postgres
    db = Database(url)
    job_id = running_job(db, f"dead-{uuid.uuid4().hex[:8]}", settings)
    sweep: subprocess.Popen | None = None
    try:
        server.stop()
        sweep = sweep_command(url)
        assert sweep.stdout is not None and sweep.stderr is not None
        assert any("waiting for it to come back" in line for line in sweep.stderr), "no word of the outage"
        server.start()
        line = sweep.stdout.readline()
        assert line.startswith("waiting ") and "before taking any lease back" in line, line
        assert state_of(db, job_id) == "running"
        out, err = sweep.communicate(timeout=120)
        assert sweep.returncode == 0, err
        assert out.startswith("1 expired lease(s) requeued"), out
        assert requeued_after_start(db, job_id) >= LEASE
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
        if not server.running:
            server.start()
        drop_jobs(db, job_id)
        db.dispose()
        drop_queue(settings)
