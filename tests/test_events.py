"""A job's live events: workers publish its states and denoising progress; Client.wait and
`sdqueue wait --progress` follow them; a cancel wakes waiters at once."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

import producer.client
from models.events import channel
from producer.client import Client
from tests.conftest import small, wait_for

TIMEOUT = 120


@pytest.fixture(autouse=True)
def progress_interval(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """SDQUEUE_PROGRESS_INTERVAL for the test's worker (before its settings are read): 0.1 s unless
    the test parametrizes it."""
    seconds = getattr(request, "param", 0.1)
    monkeypatch.setenv("SDQUEUE_PROGRESS_INTERVAL", str(seconds))
    return seconds


class Listener:
    """Every job event published while it listens, read by a thread of its own."""

    def __init__(self, redis_url: str):
        import redis

        self._redis = redis.Redis.from_url(redis_url)
        self._pubsub = self._redis.pubsub()
        self._pubsub.psubscribe(channel("*"))
        wait_for(lambda: (self._pubsub.get_message(timeout=1) or {}).get("type") == "psubscribe", timeout=10)
        self._events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                self._events.append(json.loads(message["data"]))

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in list(self._events) if e["job_id"] == job_id]

    def until_end(self, job_id: str) -> list[Any]:
        """The job's events up to its end, each as its state or its step ("running", 1, 2, ...)."""
        ends = ("succeeded", "failed", "cancelled")
        wait_for(lambda: any(e.get("state") in ends for e in self.of(job_id)), timeout=10)
        return [e["state"] if e["type"] == "state" else e["step"] for e in self.of(job_id)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()
        self._redis.close()


@pytest.fixture
def listener(settings) -> Iterator[Listener]:  # type: ignore[no-untyped-def]
    events = Listener(settings.broker_url)
    yield events
    events.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids of every Client.get from now on."""
    calls: list[str] = []
    get = Client.get

    def counting(self: Client, job_id: str) -> dict[str, Any]:
        calls.append(job_id)
        return get(self, job_id)

    monkeypatch.setattr(Client, "get", counting)
    return calls


@contextmanager
def slow_steps(seconds: float) -> Iterator[None]:
    """Every UNet call of the test's worker takes `seconds` longer."""
    from worker.tasks import generate

    engine = generate.context.engine

    def slow(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return engine.model.txt2img.unet(sample, *args, **kwargs)

    engine.unet_call = slow
    try:
        yield
    finally:
        engine.unet_call = None


def test_events_arrive_in_order_and_wait_wakes_on_the_end(settings, client, worker, listener, reads, monkeypatch):
    # Only the end's event can wake the wait before its timeout: the backstop's read is far away.
    monkeypatch.setattr(producer.client, "WAIT_BACKSTOP", 600.0)
    seen: list[dict[str, Any]] = []
    with slow_steps(0.3):  # every step outlasts the 0.1 s interval well: each one is published
        job_id = client.submit(small(prompt="a lighthouse", num_inference_steps=5))
        record = client.wait(job_id, timeout=TIMEOUT, on_event=seen.append)
    assert record["id"] == job_id and record["state"] == "succeeded", record["error"]
    assert listener.until_end(job_id) == ["running", 1, 2, 3, 4, 5, "succeeded"]
    progress = [e for e in listener.of(job_id) if e["type"] == "progress"]
    assert {e["steps"] for e in progress} == {5}
    # the record was read once before the job ended and once after its event, never polled
    assert reads.count(job_id) <= 2
    # on_event got the events the wait saw, progress included, up to the end
    assert seen[-1]["state"] == "succeeded" and {"type": "progress", "step": 5} in [
        {"type": e["type"], "step": e.get("step")} for e in seen]


@pytest.mark.parametrize("progress_interval", [60.0], indirect=True)
def test_progress_is_throttled_and_the_cli_shows_it(settings, client, worker, listener, capsys):
    from producer.cli import main

    job_id = client.submit(small(prompt="a harbour", num_inference_steps=4))
    assert main(["wait", job_id, "--progress", "--timeout", str(TIMEOUT)]) == 0
    # the first step, then none for 60 s but the last
    assert listener.until_end(job_id) == ["running", 1, 4, "succeeded"]
    out, err = capsys.readouterr()
    assert "state    succeeded" in out and "4/4" in err


def test_a_cancel_publishes_cancelled_and_wait_returns_at_once(settings, client, listener, reads, monkeypatch):
    monkeypatch.setattr(producer.client, "WAIT_BACKSTOP", 600.0)
    job_id = client.submit(small(prompt="a field"))  # no worker: it stays queued
    waited: list[dict[str, Any]] = []
    waiter = threading.Thread(target=lambda: waited.append(client.wait(job_id, timeout=TIMEOUT)))
    waiter.start()
    wait_for(lambda: reads.count(job_id) == 1, timeout=10)  # subscribed, read, waiting
    client.cancel(job_id)
    waiter.join(TIMEOUT)
    assert waited and waited[0]["state"] == "cancelled"
    assert listener.until_end(job_id) == ["cancelled"]


def test_wait_polls_the_record_without_redis(settings, client, monkeypatch):
    def no_subscription(*args: Any) -> None:
        raise AssertionError("memory:// has no pub/sub")

    monkeypatch.setattr(producer.client, "Subscription", no_subscription)
    job_id = client.submit(small(prompt="a pond"))
    canceller = threading.Timer(0.3, client.cancel, [job_id])
    canceller.start()
    reader = Client(settings.model_copy(update={"broker_url": "memory://"}))  # the demo's broker
    try:
        assert reader.wait(job_id, timeout=TIMEOUT, poll=0.05)["state"] == "cancelled"
    finally:
        canceller.join()
        reader.close()


def test_the_relay_sends_what_waits_in_one_round_trip_in_order(settings, listener):
    """A worker's events go out from its relay thread, pipelined (worker/relay.py): more than one
    pipeline's worth queued at once all arrive, each job's in order, and a broker that is away
    loses them without an error."""
    from models.events import Publisher
    from worker.relay import BATCH, EventRelay

    relay = EventRelay(Publisher(settings))
    jobs = [f"relay-{i}" for i in range(BATCH + 50)]
    for job_id in jobs:
        relay.state(job_id, "running")
    for job_id in jobs:
        relay.state(job_id, "succeeded")
    relay.close()
    wait_for(lambda: all(len(listener.of(job_id)) == 2 for job_id in jobs), timeout=30)
    assert all([e["state"] for e in listener.of(job_id)] == ["running", "succeeded"] for job_id in jobs)

    away = Publisher(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    with away.batched():
        away.state("relay-away", "running")  # sent at the end of the batch: refused, and only a hint lost
    away.close()


def test_the_relay_queues_only_the_progress_that_is_due(settings, listener):
    """A loop reports every step of every job; the relay queues a job's step only when its event is
    due (the first, then one per SDQUEUE_PROGRESS_INTERVAL, and the last), not one entry per step."""
    from models.events import Publisher
    from worker.relay import EventRelay

    relay = EventRelay(Publisher(settings.model_copy(update={"progress_interval": 3600})))
    queued: list[Any] = []
    put = relay._put
    relay._put = lambda publish, args: (queued.append(args), put(publish, args))  # type: ignore[method-assign]
    jobs = ["relay-progress-a", "relay-progress-b"]
    for step in range(1, 11):
        relay.progress(step, 10, jobs)
    relay.close()
    assert queued == [(1, 10, jobs), (10, 10, jobs)]
    wait_for(lambda: all(len(listener.of(job_id)) == 2 for job_id in jobs), timeout=30)
    assert all([e["step"] for e in listener.of(job_id)] == [1, 10] for job_id in jobs)
