"""Bulk jobs several to a broker message (SDQUEUE_JOBS_PER_MESSAGE), against the real Redis,
PostgreSQL and S3: how they are sent, how the sweeper finds each of them, and a worker that claims,
runs and acknowledges them."""

from __future__ import annotations

import base64
import json
import time

import redis

from models import broker
from models.constants import GENERATE_MANY_TASK, GENERATE_TASK, JOBS_HEADER, queue_for
from producer.client import Client
from tests.conftest import forget_unacked, interactive_queue, small, wait_for

TIMEOUT = 180


def client_of(settings, per_message: int) -> Client:  # type: ignore[no-untyped-def]
    return Client(settings.model_copy(update={"jobs_per_message": per_message}))


def messages(r: redis.Redis, queue: str) -> list[dict]:
    """The messages waiting in `queue`, oldest first (producers push on the left)."""
    return [json.loads(raw) for raw in reversed(r.lrange(queue, 0, -1))]


def test_bulk_jobs_go_several_to_a_message_and_the_sweeper_finds_each_of_them(settings):
    client = client_of(settings, 3)
    r = redis.Redis.from_url(settings.broker_url)
    bulk = queue_for(settings.queue, "bulk", settings.default_model)
    tag = f"tag-{settings.queue}"
    try:
        ids = client.submit_many([small(prompt=f"a field {i}") for i in range(7)], priority="bulk")
        alone = client.submit(small(prompt="an interactive job"))  # one a message, whatever the setting
        sent = messages(r, bulk)
        assert [m["headers"]["task"] for m in sent] == [GENERATE_MANY_TASK, GENERATE_MANY_TASK, GENERATE_TASK]
        assert [m["headers"].get(JOBS_HEADER) for m in sent] == [ids[0:3], ids[3:6], None]
        assert sent[2]["headers"]["id"] == ids[6] and sent[0]["headers"]["id"] not in ids
        assert json.loads(base64.b64decode(sent[0]["body"]))[0] == [ids[0:3]]
        assert [m["headers"]["id"] for m in messages(r, interactive_queue(settings))] == [alone]
        assert broker.live_job_ids(settings, bulk) >= set(ids)

        # the first message taken by a worker that died before claiming its jobs, 10 minutes ago
        raw = r.rpop(bulk)
        r.hset("unacked", tag, json.dumps([json.loads(raw), "", bulk]))
        r.zadd("unacked_index", {tag: time.time() - 600})
        live = broker.live_job_ids(settings, bulk)
        assert live.isdisjoint(ids[0:3]) and live >= set(ids[3:])
        r.zadd("unacked_index", {tag: time.time()})  # taken just now, by a live worker
        assert broker.live_job_ids(settings, bulk) >= set(ids)
    finally:
        r.hdel("unacked", tag)
        r.zrem("unacked_index", tag)
        r.close()
        client.close()


def test_a_worker_runs_each_job_of_its_messages_once_and_acknowledges_them(settings, request):
    client = client_of(settings, 3)
    r = redis.Redis.from_url(settings.broker_url)
    bulk = queue_for(settings.queue, "bulk", settings.default_model)
    try:
        ids = client.submit_many([small(prompt=f"a lane {i}", seed=i) for i in range(7)], priority="bulk")
        client.cancel(ids[1])  # before any worker took it: its message's other jobs run, it does not
        request.getfixturevalue("worker")
        records = [client.wait(job_id, timeout=TIMEOUT) for job_id in ids]
        assert [record["state"] for record in records] == ["succeeded", "cancelled"] + ["succeeded"] * 5
        assert all(record["attempts"] == 1 for i, record in enumerate(records) if i != 1)
        assert len({record["worker"] for i, record in enumerate(records) if i != 1}) == 1

        # the same message delivered again: its jobs ended, so nothing runs twice
        client._publisher.send(ids[0:3], bulk, 3)
        wait_for(lambda: r.llen(bulk) == 0 and not unacked(r, bulk), timeout=TIMEOUT)
        again = [client.get(job_id) for job_id in ids[0:3]]
        assert [(record["state"], record["attempts"], len(record["images"])) for record in again] == [
            ("succeeded", 1, 1), ("cancelled", 0, 0), ("succeeded", 1, 1)]
    finally:
        forget_unacked(r, settings.queue)
        r.close()
        client.close()


def unacked(r: redis.Redis, queue: str) -> list[bytes]:
    """The messages of `queue` a worker holds unacknowledged."""
    return [raw for raw in r.hvals("unacked") if json.loads(raw)[2] == queue]
