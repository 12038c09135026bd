"""Fixtures: the real Redis, PostgreSQL and SeaweedFS S3 server, the tiny model built through
the CLI, and an in-process Celery worker on the real broker."""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `make test` runs two pytest processes (pytest-xdist) on a machine of 2 cores, beside other work:
# one torch thread per worker, in this process and in every worker process a test starts.
os.environ.setdefault("SDQUEUE_TORCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.servers import S3_ACCESS_KEY, S3_SECRET_KEY, postgres_database, s3_client, seaweedfs  # noqa: E402

REDIS_URL = os.environ.get("SDQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_ADMIN_URL = os.environ.get("SDQUEUE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BUCKET = "sdqueue-test"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose models/tiny was built by `sdqueue models build-tiny`."""
    from producer.cli import main

    folder = tmp_path_factory.mktemp("data")
    assert main(["models", "build-tiny", str(folder / "models" / "tiny")]) == 0
    return folder


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # not flushed: every test has queues of its own, and other sessions may share this database
    client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database at this sdqueue's schema, for the whole session."""
    from models.db import upgrade

    with postgres_database(POSTGRES_ADMIN_URL) as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A Database at this sdqueue's schema: the session's PostgreSQL one, then a SQLite file of the test's own."""
    from models.db import Database, upgrade

    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'sdqueue.db'}"
        upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS credentials in the environment, where boto3 (and the CLI in a subprocess) reads them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def settings_env(
    data_dir: Path, redis_url: str, postgres_url: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The distributed set-up as SDQUEUE_* variables: Redis, PostgreSQL, S3; a queue and a
    storage prefix of this test's own."""
    tag = uuid.uuid4().hex[:10]
    env = {
        "SDQUEUE_BROKER_URL": redis_url,
        "SDQUEUE_DATABASE_URL": postgres_url,
        "SDQUEUE_STORAGE_URL": f"s3://{BUCKET}/{tag}",
        "SDQUEUE_S3_ENDPOINT_URL": s3_env,
        "SDQUEUE_MODEL": "tiny",
        "SDQUEUE_DATA_DIR": str(data_dir),
        "SDQUEUE_QUEUE": f"test-{tag}",
        "SDQUEUE_DEVICE": "cpu",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    # Its jobs still queued or running end here: a later test's sweeper (the database is the
    # session's) would otherwise send their messages again, into queues this teardown removed.
    settle_jobs(postgres_url, env["SDQUEUE_QUEUE"])
    # What the test's queue left in Redis (its lists, kombu's bindings, the worker registry's keys)
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{env['SDQUEUE_QUEUE']}*", count=1000))
        if keys:
            client.delete(*keys)
        forget_unacked(client, env["SDQUEUE_QUEUE"])
    finally:
        client.close()


def settle_jobs(database_url: str, queue: str) -> None:
    """Cancel the jobs of `queue` (and its bulk queue) that are still queued or running."""
    from sqlalchemy import create_engine, update

    from models.db import normalize_url
    from models.tables import Job, JobState

    engine = create_engine(normalize_url(database_url))
    try:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.queue.like(f"{queue}%"),
                                           Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]))
                         .values(state=JobState.CANCELLED.value, lease_owner=None, lease_expires_at=None))
    finally:
        engine.dispose()


def interactive_queue(settings: Any, model: str | None = None) -> str:
    """The interactive queue of `model` (the default model's) under the test's base queue."""
    from models.constants import queue_for

    return queue_for(settings.queue, "interactive", model or settings.default_model)


def forget_unacked(client: Any, queue: str) -> None:
    """Drop kombu's `unacked` entries (messages taken but never acked: a worker stopped or killed
    mid-job) of the queues named after `queue`; the hash and its index are shared by every queue."""
    tags = []
    for tag, raw in client.hscan_iter("unacked", count=1000):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if isinstance(routing_key, str) and queue in routing_key:
            tags.append(tag)
    if tags:
        client.hdel("unacked", *tags)
        client.zrem("unacked_index", *tags)


def waiting_job_ids(broker_url: str, queue: str) -> Counter:
    """Job ids of the messages waiting in `queue` (a message of several bulk jobs names them in
    its JOBS_HEADER), with how many messages each is in."""
    import redis

    from models.broker import job_ids_of

    broker = redis.Redis.from_url(broker_url)
    try:
        return Counter(job_id for raw in broker.lrange(queue, 0, -1)
                       for job_id in job_ids_of(json.loads(raw)["headers"]))
    finally:
        broker.close()


@pytest.fixture
def settings(settings_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from models.settings import load_settings

    return load_settings()


@pytest.fixture
def client(settings):  # type: ignore[no-untyped-def]
    from producer.client import Client

    c = Client(settings)
    yield c
    c.close()


@pytest.fixture
def worker(settings):  # type: ignore[no-untyped-def]
    """A real Celery worker (thread pool, in this process) on the test's Redis queue, batching."""
    from celery.contrib.testing.worker import start_worker

    from models.constants import worker_queues
    from worker.app import configure
    from worker.tasks import generate, reset_context

    app = configure(settings)
    reset_context()
    generate.context  # noqa: B018  (load the pipeline before the worker takes jobs)
    with start_worker(app, pool="threads", concurrency=settings.worker_slots, perform_ping_check=False, shutdown_timeout=120,
                      queues=worker_queues(settings.queue, settings.model)) as w:
        yield w
    # Task threads still running (a quarantined worker hands each message back after a second)
    # end before the engine stops and the test's queues are removed: none sends a message after.
    w.pool.executor.shutdown(wait=True)
    reset_context()


@pytest.fixture
def trace(settings):  # type: ignore[no-untyped-def]
    """Counts what a refused submit could have left: job rows, queued messages, stored objects."""
    import redis
    from sqlalchemy import create_engine, func, select

    from models.db import normalize_url
    from models.tables import Job

    engine = create_engine(normalize_url(settings.database_url))
    broker = redis.Redis.from_url(settings.broker_url)
    s3 = s3_client(settings.s3_endpoint_url)
    prefix = settings.storage_url.removeprefix(f"s3://{BUCKET}/")

    def count() -> tuple[int, int, int]:
        with engine.connect() as conn:
            jobs = conn.execute(select(func.count()).select_from(Job)).scalar_one()
        objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("KeyCount", 0)
        messages = sum(broker.llen(key) for key in broker.scan_iter(match=f"{settings.queue}.*", _type="list"))
        return jobs, messages, objects

    yield count
    engine.dispose()
    broker.close()


@contextmanager
def counting_unet_calls(engine):  # type: ignore[no-untyped-def]
    """The rows of every UNet call `engine` makes while inside (2 per sample: guidance)."""
    calls: list[int] = []

    def counting(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(sample.shape[0])
        return engine.model.unet(sample, *args, **kwargs)

    engine.unet_call = counting
    try:
        yield calls
    finally:
        engine.unet_call = None


@contextmanager
def gated_unet(after: int, timeout: float = 180):  # type: ignore[no-untyped-def]
    """The in-process worker's engine stops before its UNet call `after` + 1 until the event is set;
    the list has the rows of every call (2 a sample: guidance). Yields (event, list)."""
    import threading

    from worker.tasks import generate

    engine = generate.context.engine
    calls: list[int] = []
    gate = threading.Event()

    def gated(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(sample.shape[0])
        if len(calls) > after:
            gate.wait(timeout)
        return engine.model.unet(sample, *args, **kwargs)

    engine.unet_call = gated
    try:
        yield gate, calls
    finally:
        gate.set()
        engine.unet_call = None


class UnetFault:
    """Makes the in-process worker's UNet calls on its GPU thread raise `error()` while `on`;
    `raised` counts them."""

    def __init__(self, error: Callable[[], BaseException]):
        self.error = error
        self.on = True
        self.raised = 0


@contextmanager
def failing_unet(error: Callable[[], BaseException]) -> Iterator[UnetFault]:
    import threading

    from worker.tasks import generate

    engine = generate.context.engine
    original = engine.model.unet
    fault = UnetFault(error)

    def call(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "sdqueue-gpu" and fault.on:
            fault.raised += 1
            raise fault.error()
        return original(sample, *args, **kwargs)

    engine.unet_call = call
    try:
        yield fault
    finally:
        engine.unet_call = None


@pytest.fixture(scope="module")
def model(data_dir):  # type: ignore[no-untyped-def]
    """The tiny model loaded on the CPU, once per test module."""
    from models.registry import resolve_model
    from worker.pipeline import load_model

    return load_model(resolve_model("tiny", data_dir), "cpu")


@pytest.fixture(scope="module")
def cache(model):  # type: ignore[no-untyped-def]
    """The model's text-conditioning cache."""
    from worker.samples import ConditioningCache

    return ConditioningCache(model)


@contextmanager
def sdqueue_worker(model: str, log_path: Path, **env: str) -> Iterator[Any]:
    """`sdqueue worker --model MODEL` as its own process group (one torch thread, `env` beside the
    test's settings), its output in `log_path`; stopped as every started process group is."""
    import subprocess
    import sys

    from tests.servers import stop_process_group

    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--model", model, "--loglevel",
                                   "INFO"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "SDQUEUE_TORCH_THREADS": "1", **env})
        try:
            yield worker
        finally:
            stop_process_group(worker, timeout=60)


def sdqueue_cli(*args: str, timeout: float = 120) -> Any:
    """`sdqueue ARGS` in a process of its own: the CompletedProcess, its output as text."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(trace: Callable[[], Any], args: list[str], words: list[str]) -> None:
    """`sdqueue submit ARGS` exits 2 with one line holding each of `words`, and writes nothing."""
    before = trace()
    result = sdqueue_cli("submit", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert trace() == before


def max_diff(a: Any, b: Any) -> int:
    """The largest difference between two images' channel values (0..255)."""
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture
def png_bytes() -> Callable[..., bytes]:
    def make(width: int = 256, height: int = 256, color: tuple[int, int, int] = (200, 80, 40), fmt: str = "PNG") -> bytes:
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (width, height), color)
        ImageDraw.Draw(img).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(20, 120, 220))
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    return make


def wait_for(predicate: Callable[[], Any], timeout: float = 180, step: float = 0.02) -> Any:
    """Poll until `predicate` gives something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)
    return value


def small(**fields: Any) -> dict[str, Any]:
    """A request that is cheap on a CPU with the tiny model."""
    return {"width": 256, "height": 256, "num_inference_steps": 3, **fields}
