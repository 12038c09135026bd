"""The job state machine and its leases, on the real PostgreSQL database and on SQLite."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import delete, insert, select, text, update

from models import jobs
from models.db import Database
from models.tables import Batch, Image, Job, JobState, Upload, utcnow

LEASE = 30.0


def new_job(database: Database) -> str:
    job_id = str(uuid.uuid4())
    with database.session() as session:
        session.add(Job(id=job_id, mode="txt2img", params={}, seed=1, width=256, height=256,
                        num_inference_steps=1, num_images=1))
    return job_id


def claim(database: Database, job_id: str, owner: str, max_attempts: int = 3) -> tuple[jobs.Lease | None, str]:
    with database.session() as session:
        job, why = jobs.claim(session, job_id, owner, "tiny", lease_seconds=LEASE, max_attempts=max_attempts)
        return (jobs.lease_of(job) if job else None), why


def expire(database: Database, job_id: str) -> None:
    """As if the holder stopped renewing a while ago."""
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def job(database: Database, job_id: str) -> Job:
    with database.session() as session:
        return jobs.get_job(session, job_id)


def image(job_id: str, key: str) -> Image:
    return Image(job_id=job_id, index=0, seed=1, object_key=key, sha256="0" * 64, size_bytes=1, width=256, height=256)


def test_claim_run_succeed(database):
    job_id = new_job(database)
    lease, why = claim(database, job_id, "w1")
    assert lease is not None and why == "claimed" and lease.token == 1
    row = job(database, job_id)
    assert row.state == "running" and row.attempts == 1 and row.lease_owner == "w1" and row.started_at
    with database.session() as session:
        jobs.record_uploads(session, lease, ["images/x/1/0.png"])
        jobs.succeed(session, lease, [image(job_id, "images/x/1/0.png")])
    row = job(database, job_id)
    assert row.state == "succeeded" and row.finished_at and row.lease_owner is None
    with database.session() as session:
        assert session.scalars(select(Upload).where(Upload.job_id == job_id)).all() == []  # recorded: no orphan
    assert claim(database, job_id, "w2") == (None, "it is succeeded")  # a late delivery does nothing


def test_a_second_delivery_never_runs_a_live_job_twice(database):
    job_id = new_job(database)
    lease, _ = claim(database, job_id, "w1")
    assert claim(database, job_id, "w1") == (None, "this worker holds it already")
    other, why = claim(database, job_id, "w2")
    assert other is None and why.startswith("w1 holds it until")
    assert job(database, job_id).attempts == 1


def test_an_expired_lease_is_taken_over_and_the_stale_holder_is_fenced(database):
    job_id = new_job(database)
    old, _ = claim(database, job_id, "w1")
    expire(database, job_id)
    new, why = claim(database, job_id, "w2")
    assert new is not None and new.token == old.token + 1
    row = job(database, job_id)
    assert row.suspect and row.failures == 0 and row.attempts == 2  # it shared a crash: runs alone, not charged
    with database.session() as session:  # the stale holder can neither upload nor record
        with pytest.raises(jobs.LeaseLost, match="held by w2"):
            jobs.record_uploads(session, old, ["images/x/1/0.png"])
    with database.session() as session:
        with pytest.raises(jobs.LeaseLost):
            jobs.succeed(session, old, [image(job_id, "images/x/1/0.png")])
    with database.session() as session:
        assert jobs.renew(session, "w1", [job_id], LEASE) == set()  # its heartbeat learns it lost the job
        assert jobs.renew(session, "w2", [job_id], LEASE) == {job_id}
    with database.session() as session:
        jobs.succeed(session, new, [image(job_id, "images/x/2/0.png")])
    assert [i.object_key for i in job(database, job_id).images] == ["images/x/2/0.png"]


def test_a_job_that_kills_its_worker_alone_is_dead_lettered_after_max_attempts(database):
    job_id = new_job(database)
    for attempt in (1, 2):
        lease, _ = claim(database, job_id, f"w{attempt}", max_attempts=2)
        with database.session() as session:
            jobs.running_alone(session, lease)
        expire(database, job_id)
        with database.session() as session:
            back = jobs.requeue_expired(jobs.get_job(session, job_id, lock=True), max_attempts=2)
        assert back is (attempt == 1)
    row = job(database, job_id)
    assert row.state == "failed" and row.dead_letter and row.failures == 2
    assert "its worker died while running it alone" in row.error and row.error.startswith("dead-lettered after 2")


def test_a_worker_dying_after_a_job_left_the_gpu_is_not_charged_to_it(database):
    job_id = new_job(database)
    lease, _ = claim(database, job_id, "w1")
    with database.session() as session:
        jobs.running_alone(session, lease)
    with database.session() as session:
        jobs.running_alone(session, lease, False)  # denoised; its images wait to be stored
    expire(database, job_id)  # then another job kills the worker
    with database.session() as session:
        assert jobs.requeue_expired(jobs.get_job(session, job_id, lock=True), max_attempts=1)
    row = job(database, job_id)
    assert row.state == "queued" and row.failures == 0 and row.suspect


def test_charged_failures_retry_then_dead_letter(database):
    job_id = new_job(database)
    for attempt in (1, 2, 3):
        lease, _ = claim(database, job_id, "w1")
        with database.session() as session:
            again = jobs.charge(session, lease, f"RuntimeError: boom {attempt}", max_attempts=3)
        assert again is (attempt < 3)
        row = job(database, job_id)
        assert row.state == ("queued" if attempt < 3 else "failed") and row.lease_owner is None
    assert row.dead_letter and row.failures == 3 and "boom 3" in row.error


def test_fail_is_final_and_not_a_dead_letter(database):
    job_id = new_job(database)
    lease, _ = claim(database, job_id, "w1")
    with database.session() as session:
        jobs.fail(session, lease, "prompt cannot be parsed")
    row = job(database, job_id)
    assert row.state == "failed" and not row.dead_letter and row.error == "prompt cannot be parsed"


def test_release_gives_back_without_charge(database):
    a, b = new_job(database), new_job(database)
    claim(database, a, "w1")
    claim(database, b, "w2")
    with database.session() as session:
        assert jobs.release(session, "w1", [a, b]) == [a]  # only what w1 holds
    row = job(database, a)
    assert row.state == "queued" and row.failures == 0 and row.lease_owner is None and row.enqueued_at
    lease, _ = claim(database, a, "w3")
    assert lease.token == 2 and job(database, a).attempts == 2


def test_cancel_of_a_running_job_ends_the_lease(database):
    job_id = new_job(database)
    lease, _ = claim(database, job_id, "w1")
    with database.session() as session:
        jobs.cancel(session, job_id)
    with database.session() as session:
        assert jobs.renew(session, "w1", [job_id], LEASE) == set()
        with pytest.raises(jobs.LeaseLost, match="it is cancelled"):
            jobs.check_held(session, lease)
    assert claim(database, job_id, "w2") == (None, "it is cancelled")  # whatever message arrives


def test_illegal_transitions(database):
    job_id = new_job(database)
    with database.session() as session:
        jobs.cancel(session, job_id)
    with database.session() as session:
        with pytest.raises(jobs.IllegalTransition, match="is cancelled: it cannot become cancelled"):
            jobs.cancel(session, job_id)


def test_terminal_states():
    assert {s for s in JobState if s.terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def test_one_workers_repeated_failures_never_dead_letter_a_job_others_could_run(database):
    job_id = new_job(database)
    two_healthy = lambda: 2  # noqa: E731  (the registry's count of workers not quarantined)
    for attempt in (1, 2):
        with database.session() as session:
            found, _ = jobs.claim(session, job_id, "broken", "tiny", lease_seconds=LEASE, max_attempts=2,
                                  healthy_workers=two_healthy)
            lease = jobs.lease_of(found)
        with database.session() as session:
            assert jobs.charge(session, lease, "RuntimeError: boom", max_attempts=2, healthy_workers=2)
    row = job(database, job_id)
    assert row.state == "queued" and row.failures == 2 and row.failed_on == ["broken"] * 2 and not row.dead_letter
    # the worker it failed on leaves it to another, while there is one
    with database.session() as session:
        assert jobs.claim(session, job_id, "broken", "tiny", lease_seconds=LEASE, max_attempts=2,
                          healthy_workers=two_healthy) == (None, jobs.LEFT_TO_OTHERS)
    # a second worker fails it too: now it is the job's fault
    lease, _ = claim(database, job_id, "healthy", max_attempts=2)
    with database.session() as session:
        assert not jobs.charge(session, lease, "RuntimeError: boom", max_attempts=2, healthy_workers=2)
    row = job(database, job_id)
    assert row.dead_letter and row.failed_on == ["broken", "broken", "healthy"] and row.failures == 3


def test_charges_of_a_host_found_at_fault_are_refunded(database):
    job_id = new_job(database)
    lease, _ = claim(database, job_id, "broken")
    with database.session() as session:
        jobs.charge(session, lease, "RuntimeError: boom", max_attempts=3, healthy_workers=2)
    with database.session() as session:
        assert jobs.refund(session, [job_id], "other") == []  # only the charging worker's own
        assert jobs.refund(session, [job_id], "broken") == [job_id]
    row = job(database, job_id)
    assert row.failures == 0 and row.failed_on == [] and row.state == "queued"


def test_suspects_that_die_together_are_split_in_halves_until_one_is_charged(database):
    """A worker dies holding 8 jobs: all become one suspect group. The group runs with nothing
    else and kills a worker again: halves of 4, then 2, then 1, which is charged: log2(8) rounds."""
    ids = [new_job(database) for _ in range(8)]
    poison = ids[5]
    for job_id in ids:
        claim(database, job_id, "w0")
        expire(database, job_id)

    def sweep() -> tuple[list[str], list[str]]:
        with database.session() as session:
            dead = list(session.scalars(select(Job).where(Job.state == "running", Job.id.in_(ids)).with_for_update()))
            requeued, lettered = jobs.requeue_dead(dead, max_attempts=1)
            return [j.id for j in requeued], [j.id for j in lettered]

    requeued, _ = sweep()
    assert sorted(requeued) == sorted(ids)
    rows = [job(database, i) for i in ids]
    assert all(r.suspect and r.failures == 0 for r in rows) and len({r.suspect_group for r in rows}) == 1
    rounds = 0
    while True:
        # the poison job's group runs on a fresh worker (with nothing else), which dies
        group = job(database, poison).suspect_group
        members = [i for i in ids if job(database, i).suspect_group == group and job(database, i).state == "queued"]
        rounds += 1
        owner = f"w{rounds}"
        for job_id in members:
            lease, _ = claim(database, job_id, owner)
            with database.session() as session:
                jobs.running_alone(session, lease)
            expire(database, job_id)
        requeued, lettered = sweep()
        if lettered:
            break
        assert len(members) > 1 and sorted(requeued) == sorted(members)
        halves = {job(database, i).suspect_group for i in members}
        assert len(halves) == 2 and group not in halves
    assert lettered == [poison] and rounds == 4  # groups of 8, 4, 2, then the poison job alone
    assert all(job(database, i).failures == 0 for i in ids if i != poison)


def test_a_claim_its_worker_never_heard_of_is_given_back_once_its_lease_ran_out(database):
    # A worker of its own: the leases other tests' "w1" left running run out while this file runs
    worker = f"w1-{uuid.uuid4().hex[:8]}"
    held, forgotten, fresh = new_job(database), new_job(database), new_job(database)
    for job_id in (held, forgotten, fresh):
        claim(database, job_id, worker)
    expire(database, held)  # its heartbeat could not renew it (an outage): still held, kept
    expire(database, forgotten)  # the claim's commit answered nobody: the worker never held it
    with database.session() as session:
        given_back = jobs.release_forgotten(session, worker, [held])
    assert [job_id for job_id, _ in given_back] == [forgotten]
    assert job(database, forgotten).state == "queued" and job(database, forgotten).failures == 0
    assert job(database, held).state == "running" and job(database, fresh).state == "running"  # fresh: just claimed


def test_an_expired_lease_of_a_live_worker_is_not_taken_over_by_a_second_delivery(database):
    job_id = new_job(database)
    claim(database, job_id, "w1")
    expire(database, job_id)  # w1 could not renew it during an outage; its heartbeat is fresh in the registry
    with database.session() as session:
        found, why = jobs.claim(session, job_id, "w2", "tiny", lease_seconds=LEASE, max_attempts=3,
                                live_workers=lambda: {"w1"})
    assert found is None and "w1 lives" in why
    with database.session() as session:
        found, why = jobs.claim(session, job_id, "w2", "tiny", lease_seconds=LEASE, max_attempts=3,
                                live_workers=lambda: set())  # w1 is gone: taken over
    assert found is not None and found.lease_owner == "w2"


# --- the worker's one-statement paths (PostgreSQL; on SQLite they decline and `claim`/`succeed` go) ---

def batch_values() -> dict:
    return {"id": str(uuid.uuid4()), "worker": "w1", "model": "tiny", "model_revision": None, "scheduler": "s",
            "device": "cpu", "dtype": "float32", "size": 1, "versions": {"torch": "x"}, "compat_key": "k", "jobs": 1,
            "seconds": 0.1, "peak_memory_bytes": None, "started_at": utcnow(), "finished_at": utcnow()}


def image_values(key: str, batch_id: str) -> dict:
    return {"index": 0, "seed": 1, "object_key": key, "sha256": "0" * 64, "pixel_sha256": None, "size_bytes": 1,
            "width": 256, "height": 256, "batch_id": batch_id, "batch_size": None, "batch_position": None,
            "steps_run": 3, "shared_max": 2, "shared_mean": 1.5}


def test_one_statement_claim_uploads_and_success_record_what_the_general_path_does(database):
    job_id = new_job(database)
    claimed = jobs.claim_queued(database, [job_id], "w1", "tiny", lease_seconds=LEASE, max_attempts=3).get(job_id)
    if database.engine.dialect.name == "sqlite":
        assert claimed is None  # the general path's, always
        return
    lease = jobs.lease_of(claimed)
    assert lease == jobs.Lease(job_id, "w1", 1) and claimed.attempts == 1 and claimed.params == {}
    row = job(database, job_id)
    assert row.state == "running" and row.worker == "w1" and row.model == "tiny" and row.lease_expires_at
    # a second delivery: not plainly queued, so the one statement declines and `claim` says why
    assert jobs.claim_queued(database, [job_id], "w1", "tiny", lease_seconds=LEASE, max_attempts=3) == {}
    assert claim(database, job_id, "w1") == (None, "this worker holds it already")

    key = f"images/{job_id}/1/0.png"
    assert jobs.record_uploads_now(database, [(lease, [key])]) == {job_id}
    assert jobs.record_uploads_now(database, [(lease, [key])]) == set()  # written already: `record_uploads` decides
    batch = batch_values()
    assert jobs.succeed_now(database, [(lease, [image_values(key, batch["id"])])], batch) == {job_id}
    row = job(database, job_id)
    assert row.state == "succeeded" and row.finished_at and row.lease_owner is None and row.error is None
    assert [(i.object_key, i.batch_id, i.steps_run, i.shared_mean) for i in row.images] == [(key, batch["id"], 3, 1.5)]
    with database.session() as session:
        assert session.scalars(select(Upload).where(Upload.job_id == job_id)).all() == []
    assert not jobs.succeed_now(database, [(lease, [image_values(key, batch["id"])])], batch)  # ended: nothing again


def test_one_statement_claims_the_plainly_queued_jobs_of_a_message_and_leaves_the_rest_to_claim(database):
    if database.engine.dialect.name == "sqlite":
        pytest.skip("PostgreSQL only: on SQLite the general path runs")
    queued, running, ended, failed = (new_job(database) for _ in range(4))
    claim(database, running, "w2")
    with database.session() as session:
        session.execute(update(Job).where(Job.id == ended).values(state="cancelled"))
        session.execute(update(Job).where(Job.id == failed).values(failures=3))
    missing = str(uuid.uuid4())
    claimed = jobs.claim_queued(database, [missing, queued, running, ended, failed], "w1", "tiny",
                                lease_seconds=LEASE, max_attempts=3)
    assert list(claimed) == [queued] and jobs.lease_of(claimed[queued]) == jobs.Lease(queued, "w1", 1)
    assert job(database, running).lease_owner == "w2" and job(database, ended).state == "cancelled"
    assert job(database, failed).state == "queued"  # `claim` decides whether w1 may take it again


def test_one_statement_paths_refuse_a_lost_lease_and_leave_webhook_jobs_to_the_general_path(database):
    if database.engine.dialect.name == "sqlite":
        pytest.skip("PostgreSQL only: on SQLite the general path runs")
    job_id = new_job(database)
    stale = jobs.lease_of(jobs.claim_queued(database, [job_id], "w1", "tiny", lease_seconds=LEASE,
                                            max_attempts=3)[job_id])
    expire(database, job_id)
    current, _ = claim(database, job_id, "w2")  # taken over: w1's lease is stale
    key = f"images/{job_id}/{stale.token}/0.png"
    assert not jobs.record_uploads_now(database, [(stale, [key])])
    with pytest.raises(jobs.LeaseLost), database.session() as session:
        jobs.record_uploads(session, stale, [key])
    batch = batch_values()
    assert not jobs.succeed_now(database, [(stale, [image_values(key, batch["id"])])], batch)
    assert job(database, job_id).state == "running" and job(database, job_id).lease_owner == "w2"

    with database.session() as session:  # a job with a webhook: its end writes a delivery row
        session.execute(update(Job).where(Job.id == job_id).values(webhook_url="http://127.0.0.1:9/hook"))
    assert not jobs.succeed_now(database, [(current, [])], batch)
    with database.session() as session:
        jobs.succeed(session, current, [], batch)
    row = job(database, job_id)
    assert row.state == "succeeded" and row.webhook is not None and row.webhook.state == "pending"


def test_one_statement_records_the_jobs_of_a_batch_together_and_leaves_out_each_that_is_not_its_own(database):
    """A batch's jobs: two whose leases hold, one taken over by another worker, one with a webhook.
    The statements record the two (and the webhook job's uploads); the others are left to the
    general path, and nothing of theirs is written."""
    if database.engine.dialect.name == "sqlite":
        pytest.skip("PostgreSQL only: on SQLite the general path runs")
    ids = [new_job(database) for _ in range(4)]
    first, second, stale_id, hooked = ids
    claimed = jobs.claim_queued(database, ids, "w1", "tiny", lease_seconds=LEASE, max_attempts=3)
    leases = {job_id: jobs.lease_of(claimed[job_id]) for job_id in ids}
    expire(database, stale_id)
    claim(database, stale_id, "w2")
    with database.session() as session:
        session.execute(update(Job).where(Job.id == hooked).values(webhook_url="http://127.0.0.1:9/hook"))
    keys = {job_id: [f"images/{job_id}/1/{i}.png" for i in range(2)] for job_id in ids}
    assert jobs.record_uploads_now(database, [(leases[j], keys[j]) for j in ids]) == {first, second, hooked}
    batch = batch_values()
    images = {j: [{**image_values(key, batch["id"]), "index": i} for i, key in enumerate(keys[j])] for j in ids}
    assert jobs.succeed_now(database, [(leases[j], images[j]) for j in ids], batch) == {first, second}
    for job_id in (first, second):
        row = job(database, job_id)
        assert row.state == "succeeded" and [i.object_key for i in row.images] == keys[job_id]
    assert job(database, stale_id).lease_owner == "w2" and job(database, stale_id).images == []
    assert job(database, hooked).state == "running" and job(database, hooked).images == []
    with database.session() as session:
        left = set(session.scalars(select(Upload.object_key).where(Upload.job_id.in_(ids))))
    assert left == set(keys[hooked])  # the recorded jobs' uploads rows are gone; the webhook job's wait for it
    with database.session() as session:
        assert session.get(Batch, batch["id"]) is not None


def test_one_statement_paths_find_the_job_by_its_id_whatever_the_statistics_say(postgres_url):
    """After a big enqueue the planner's statistics say no job is running; a plain `state =
    'running'` then led it through ix_jobs_state_lease, over every running job (with these 2,000
    queued jobs it did)."""
    database = Database(postgres_url)
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    try:
        with database.session() as session:
            session.execute(insert(Job), [{"id": job_id, "mode": "txt2img", "params": {}, "seed": 1, "width": 256,
                                           "height": 256, "num_inference_steps": 1, "num_images": 1} for job_id in ids])
        with database.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE jobs")
            for statement in (jobs._CLAIM.element, jobs._RECORD_UPLOADS, jobs._SUCCEED):
                params = {name: None for name in statement.compile().params}
                params.update(job_id=ids[0], job_ids=ids[:8], owner="w1", model="tiny", now=utcnow(), max_attempts=3,
                              l_job_id=ids[:8], l_owner=["w1"] * 8, l_token=[1] * 8, u_job_id=ids[:8], u_key=["k"] * 8,
                              i_job_id=ids[:8], i_object_key=["k"] * 8)
                plan = "\n".join(row[0] for row in conn.execute(text("EXPLAIN " + statement.text), params))
                assert "jobs_pkey" in plan and "ix_jobs_state" not in plan, plan
    finally:
        with database.session() as session:  # nothing left queued for other tests' sweepers to send
            session.execute(delete(Job).where(Job.id.in_(ids)))
        database.dispose()
