"""Sizing: how many jobs/s one Redis, one PostgreSQL and one S3 server hold for sdqueue's own
operations, and at how many GPU workers each becomes the bottleneck.

Every operation runs through the code sdqueue runs:
  Redis       job messages pushed as producers push them (producer/publish.py: pipelined, 1,000 a
              batch); taken and acknowledged by a kombu consumer as a worker takes them (BRPOP on
              both queues, ZADD + HSET into the unacked set, ZREM + HDEL at the ack); job events
              published (models/events.py)
  PostgreSQL  job rows enqueued (producer/bulk.py: COPY in batches of 1,000, then marked sent);
              claims (models.jobs.claim, a transaction per job, as the task threads claim);
              heartbeats (models.jobs.renew of a worker's 16 held jobs); records (the batch row,
              record_uploads, then succeed with the image rows, as the worker's CPU pool records);
              reads (job_record by id, as `sdqueue status` and the API read)
  S3          PUTs of PNGs through models/storage.py's S3 backend to a SeaweedFS `weed mini` started
              here on loopback: 512x512 and 768x768, noisy enough to be the size of real images
Threads stand for workers: each has its own connection (Database, boto3 client). Every figure is
repeated (--repeat, the thread counts taking turns) and given as median [min-max]. Beside each rate
is the server's own CPU time per operation (Redis's INFO; the kernel's run time of the PostgreSQL
backends serving this run and of the weed process), and the client's (this process): on a small
machine the clients take CPU from the servers, and in a deployment they run on the workers' hosts.

Then the load one GPU worker puts on each part (--images-per-s of 768x768 images, made 1 or 4 to a
job) and the worker count at which each part saturates: measured (each operation's best rate here,
clients beside the server: a floor) and server-bound (the server's CPU time per operation with the
most threads, on this machine's cores: Redis one, PostgreSQL and SeaweedFS all; commit flushes,
autovacuum, lock waits and the network left out: a ceiling).

    .venv/bin/python bench/sizing.py            # about 4 minutes on 2 cores
    .venv/bin/python bench/sizing.py --quick    # a tenth of the operations, one repeat: a smoke test

Needs Redis (database 12 by default, which must be empty: its keys are deleted at the end) and
PostgreSQL (trust auth; a database of its own, dropped at the end); starts its own `weed mini`.
Writes the table, with the machine's description, to bench/results/sizing-cpu-DATE.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.enqueue import postgres_database, write_results  # noqa: E402
from models import jobs  # noqa: E402
from models.constants import queue_for, worker_queues  # noqa: E402
from models.db import Database, upgrade  # noqa: E402
from models.events import Publisher  # noqa: E402
from models.request import parse_request  # noqa: E402
from models.settings import load_settings  # noqa: E402
from models.storage import object_key_for, open_storage  # noqa: E402
from models.tables import Batch, Image, Job, Run, utcnow  # noqa: E402
from producer.bulk import BATCH, insert_jobs, job_row  # noqa: E402
from producer.client import make_sender  # noqa: E402
from producer.publish import BulkPublisher  # noqa: E402

QUEUE = "sdqueue-sizing"
# A worker on an 80 GB GPU: 8 images of 768x768 in one denoising loop (SDQUEUE_PIXEL_BUDGET's
# default), SDQUEUE_WORKER_SLOTS jobs held, its heartbeat every SDQUEUE_HEARTBEAT_SECONDS.
LOOP_IMAGES = 8
HELD = 16
HEARTBEAT_SECONDS = 5.0
# Its events: a job's progress at most every SDQUEUE_PROGRESS_INTERVAL, its status every
# SDQUEUE_STATUS_INTERVAL (the defaults), and two state events a job (running, succeeded).
PROGRESS_INTERVAL = 0.25
STATUS_INTERVAL = 2.0
STATE_EVENTS = 2
# Reads of a job's row by whoever follows it: one when `sdqueue wait` (or the API's event stream)
# subscribes, one at its end.
READS_PER_JOB = 2
# Leases long enough that none lapses while the bench holds it.
LEASE_SECONDS = 3600
# Noise added to a smooth picture: PNGs of about 1.7 bytes a pixel, as SD's images are.
NOISE = 6


def spread(values: Sequence[float], digits: int = 0) -> str:
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


@dataclass
class Figure:
    """One operation's repeats: operations per second, and the server's CPU seconds per operation."""

    part: str
    op: str
    unit: str
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)  # this process's CPU seconds per operation
    object_bytes: int = 0  # S3: the size of each object put

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_per_op(self) -> float:
        return statistics.median(self.cpu)

    def add(self, count: int, seconds: float, server: float, client: float) -> None:
        self.rates.append(count / seconds)
        self.cpu.append(server / count)
        self.client.append(client / count)

    def line(self) -> str:
        server = f"{1 / self.cpu_per_op:,.0f}/s a server core" if self.cpu_per_op > 0 else "-"
        return (f"{self.part:10} {self.op:36} {spread(self.rates):>24} {self.unit:11} server CPU "
                f"{spread([c * 1e6 for c in self.cpu]):>19} us each ({server}); client CPU "
                f"{statistics.median(self.client) * 1e6:,.0f} us")


def scaled(args: argparse.Namespace, count: int) -> int:
    """How many operations a case makes: `count`, a tenth with --quick."""
    return max(count // 10, 16) if args.quick else count


# -- what a server spent ---------------------------------------------------------------------------

def process_cpu(pid: int) -> float:
    """CPU seconds a process's threads have run, from the scheduler's nanoseconds (/proc/PID/stat
    counts 10 ms ticks: too coarse for 16 backends that each run a few hundred ms); 0 once it is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    nanoseconds = 0
    for task in tasks:
        try:
            nanoseconds += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            pass
    return nanoseconds / 1e9


def cpu_spent(read: Callable[[], dict[Any, float]], before: dict[Any, float]) -> float:
    """CPU seconds since `before` (a process that appeared since counts whole)."""
    after = read()
    return sum(seconds - before.get(key, 0.0) for key, seconds in after.items())


def in_threads(resources: Sequence[Any], items: Sequence[Any], act: Callable[[Any, Any], None],
               server_cpu: Callable[[], dict[Any, float]]) -> tuple[float, float, float]:
    """`act(resources[i], item)` for every item, split over one thread per resource, started together;
    (seconds, the server's CPU seconds, this process's CPU seconds) for all of them."""
    threads = len(resources)
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            for item in items[i::threads]:
                act(resources[i], item)
        except BaseException as exc:  # noqa: BLE001  (raised again below, in the caller's thread)
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    before, client = server_cpu(), time.process_time()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - began
    client = time.process_time() - client
    spent = cpu_spent(server_cpu, before)
    if errors:
        raise errors[0]
    return seconds, spent, client


# -- Redis -------------------------------------------------------------------------------------------

def redis_part(args: argparse.Namespace, lines: list[str]) -> dict[str, Figure]:
    import redis
    from kombu import Connection, Consumer, Exchange, Queue

    broker = redis.Redis.from_url(args.redis_url)
    if broker.dbsize():
        raise SystemExit(f"{args.redis_url} is not empty: give --redis-url a database of its own")
    info = broker.info("server")
    lines.append(f"# Redis {info['redis_version']} at {args.redis_url} (shared with other users of the server; "
                 f"its CPU counts theirs too)")

    def server_cpu() -> dict[str, float]:
        cpu = broker.info("cpu")
        return {"redis": cpu["used_cpu_user"] + cpu["used_cpu_sys"]}

    settings = load_settings(broker_url=args.redis_url, queue=QUEUE)
    queue = queue_for(QUEUE, "bulk", settings.default_model)
    push = Figure("Redis", "push (pipelined LPUSH)", "messages/s")
    take = Figure("Redis", "take + ack (kombu consumer)", "messages/s")
    event = Figure("Redis", "event (PUBLISH)", "events/s")
    memory: list[float] = []
    count = scaled(args, 10_000)
    try:
        for _ in range(args.repeat):
            # 1. push, as a run's enqueue does
            ids = [str(uuid.uuid4()) for _ in range(count)]
            publisher = BulkPublisher(make_sender(settings), args.redis_url)
            used = broker.info("memory")["used_memory"]
            chunks = [ids[i : i + BATCH] for i in range(0, count, BATCH)]
            push.add(count, *in_threads([publisher], chunks, lambda p, chunk: p.send(chunk, queue), server_cpu))
            publisher.close()
            memory.append((broker.info("memory")["used_memory"] - used) / count)
            assert broker.llen(queue) == count
            # 2. take and acknowledge each, one at a time, as a worker's consumer does (prefetch 1, acks late)
            with Connection(args.redis_url, transport_options={"visibility_timeout": 3600}) as conn:
                queues = [Queue(name, Exchange(name), routing_key=name) for name in worker_queues(QUEUE, settings.default_model)]
                taken = [0]

                def ack(message: Any) -> None:
                    message.ack()
                    taken[0] += 1

                consumer = Consumer(conn, queues, on_message=ack, accept=["json"], prefetch_count=1)
                consumer.consume()

                def drain(_: Any, __: Any) -> None:
                    while taken[0] < count:
                        conn.drain_events(timeout=10)

                take.add(count, *in_threads([None], [None], drain, server_cpu))
                consumer.cancel()
            assert broker.llen(queue) == 0 and broker.hlen("unacked") == 0
            # 3. job events, each on its job's channel, as a worker's publisher sends them
            events = Publisher(settings)
            event.add(count, *in_threads([events], ids, lambda p, job_id: p.progress(job_id, 25, 25), server_cpu))
            events.close()
    finally:
        for key in broker.scan_iter(count=1000):
            broker.delete(key)
        broker.close()
    lines.append(f"# Redis holds a waiting message in {spread(memory)} bytes (used_memory per message pushed)")
    return {"push": push, "take": take, "event": event}


# -- PostgreSQL -------------------------------------------------------------------------------------

def postgres_part(args: argparse.Namespace, lines: list[str]) -> dict[str, Figure]:
    import psycopg

    url, drop = postgres_database(args.postgres_url)
    name = url.rsplit("/", 1)[1]
    databases: list[Database] = []
    try:
        upgrade(url)
        admin = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        server = {s: admin.execute(f"SHOW {s}").fetchone()[0]
                  for s in ("server_version", "fsync", "synchronous_commit", "shared_buffers")}
        lines.append("# PostgreSQL " + ", ".join(f"{k} {v}" for k, v in server.items())
                     + " (the server these tests share; a scratch database of its own)")

        def server_cpu() -> dict[int, float]:
            """The backends serving this database (other databases' work is not counted)."""
            pids = [row[0] for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))]
            return {pid: process_cpu(pid) for pid in pids}

        # One Database per thread, as each worker has its own; made once, so the backends live on.
        most = max(args.threads)
        databases = [Database(url) for _ in range(most)]
        for db in databases:
            with db.session() as session:
                session.connection()
        storage = open_storage("s3://images/sdqueue")  # where locations point; nothing is stored

        figures: dict[str, Figure] = {}

        def figure(key: str, op: str, unit: str) -> Figure:
            return figures.setdefault(key, Figure("PostgreSQL", op, unit))

        # 1. enqueue: a run's rows, written and marked sent a batch at a time
        rows = scaled(args, 20_000)
        queued: list[str] = []
        job_settings = load_settings(queue=QUEUE)
        for repeat in range(args.repeat):
            run_id = str(uuid.uuid4())
            with databases[0].session() as session:
                session.add(Run(id=run_id, name=f"sizing-{repeat}", priority="bulk", defaults={}))
            values = [job_row(parse_request({"prompt": f"a watercolour of lighthouse number {i} at dusk",
                                             "width": 768, "height": 768, "seed": i}),
                              settings=job_settings, priority="bulk", storage=storage, run_id=run_id, run_key=f"row-{i}")
                      for i in range(rows)]

            def enqueue(db: Database, chunk: list[dict[str, Any]]) -> None:
                with db.session() as session:
                    written = insert_jobs(session, chunk)
                with db.session() as session:
                    session.execute(update(Job).where(Job.id.in_(list(written)), Job.enqueued_at.is_(None))
                                    .values(enqueued_at=utcnow()))

            chunks = [values[i : i + BATCH] for i in range(0, rows, BATCH)]
            figure("enqueue", "enqueue (COPY, 1,000 a batch)", "jobs/s").add(
                rows, *in_threads(databases[:1], chunks, enqueue, server_cpu))
            queued += [value["id"] for value in values]
        # what a transaction that writes costs in time, whatever it writes: the commit's WAL flush
        commits = scaled(args, 300)
        began = time.perf_counter()
        for _ in range(commits):
            with databases[0].session() as session:
                session.execute(update(Run).where(Run.id == run_id).values(sealed_at=utcnow()))
        commit_ms = (time.perf_counter() - began) / commits * 1e3
        lines.append(f"# PostgreSQL commits a one-row UPDATE in {commit_ms:.1f} ms from one thread (the WAL "
                     "flushed to this machine's disk at each commit)")

        # 2. claims, a transaction each, from 1, 4 and 16 threads
        claims = scaled(args, 1_500)
        leases: dict[str, list[jobs.Lease]] = {}
        for repeat in range(args.repeat):
            for threads in args.threads:
                owners = [f"sizing-{threads}-{repeat}-{i}" for i in range(threads)]
                held: list[list[jobs.Lease]] = [leases.setdefault(owner, []) for owner in owners]

                def claim(worker: tuple[Database, str, list[jobs.Lease]], job_id: str) -> None:
                    db, owner, mine = worker
                    with db.session() as session:
                        job, why = jobs.claim(session, job_id, owner, "sd21", lease_seconds=LEASE_SECONDS,
                                              max_attempts=3)
                        assert job is not None, why
                        dict(job.params)
                        mine.append(jobs.lease_of(job))

                batch, queued = queued[:claims], queued[claims:]
                figure(f"claim-{threads}", f"claim, {threads} thread(s)", "jobs/s").add(
                    claims, *in_threads(list(zip(databases, owners, held)), batch, claim, server_cpu))

        # 3. heartbeats: each thread a worker renewing 16 of the jobs it holds in one UPDATE; the next
        #    16 at each beat, since a worker renews each job a few times at most, not hundreds of times
        holders = [(owner, [lease.job_id for lease in held]) for owner, held in leases.items()
                   if len(held) >= min(HELD, claims // most)]
        renews = scaled(args, 600)
        for repeat in range(args.repeat):
            for threads in args.threads:

                def renew(worker: tuple[Database, tuple[str, list[str]]], beat: int) -> None:
                    db, (owner, held) = worker
                    start = beat * HELD % len(held)
                    ids = (held + held)[start : start + min(HELD, len(held))]
                    with db.session() as session:
                        assert len(jobs.renew(session, owner, ids, LEASE_SECONDS)) == len(ids)

                figure(f"renew-{threads}", f"renew {HELD} held, {threads} thread(s)", "renews/s").add(
                    renews, *in_threads(list(zip(databases, holders[:threads])), range(renews), renew, server_cpu))

        # 4. records: the batch row, the uploads noted, then succeeded with the image rows
        records = scaled(args, 500)
        claimed = [lease for held in leases.values() for lease in held]
        succeeded: list[str] = []
        for repeat in range(args.repeat):
            for images in (1, 4):
                for threads in args.threads:

                    def record(db: Database, lease: jobs.Lease, images: int = images) -> None:
                        record_job(db, lease, images)

                    batch, claimed = claimed[:records], claimed[records:]
                    if len(batch) < records:
                        raise SystemExit("not enough claimed jobs left to record: claim more (a bug in the counts)")
                    figure(f"record{images}-{threads}", f"record {images} image(s), {threads} thread(s)", "jobs/s").add(
                        records, *in_threads(databases[:threads], batch, record, server_cpu))
                    succeeded += [lease.job_id for lease in batch]

        # 5. reads of a job's whole record, as `sdqueue status` and the API read it
        reads = scaled(args, 1_500)
        for repeat in range(args.repeat):
            for threads in args.threads:

                def read(db: Database, job_id: str) -> None:
                    with db.session() as session:
                        jobs.job_record(jobs.get_job(session, job_id), locate=storage.location)

                chosen = [succeeded[(repeat * reads + i * 7919) % len(succeeded)] for i in range(reads)]
                figure(f"read-{threads}", f"read job_record, {threads} thread(s)", "reads/s").add(
                    reads, *in_threads(databases[:threads], chosen, read, server_cpu))

        jobs_bytes, images_bytes, job_count, image_count = admin.execute(
            "SELECT pg_total_relation_size('jobs'), pg_total_relation_size('images') + "
            "pg_total_relation_size('batches') + pg_total_relation_size('uploads'), "
            "(SELECT count(*) FROM jobs), (SELECT count(*) FROM images)").fetchone()
        lines.append(f"# PostgreSQL holds a job in {jobs_bytes / job_count:,.0f} bytes (jobs with its indexes), "
                     f"an image in {images_bytes / image_count:,.0f} (images, batches, uploads with indexes)")
        admin.close()
        return figures
    finally:
        for db in databases:
            db.dispose()
        drop()


def record_job(db: Database, lease: jobs.Lease, images: int) -> None:
    """What the worker's CPU pool writes for a job it made: as worker/engine.py's _finish, _store, _record."""
    batch = Batch(id=str(uuid.uuid4()), worker=lease.owner, model="stabilityai/stable-diffusion-2-1",
                  model_revision="main", scheduler="EulerDiscreteScheduler", device="cuda:0", dtype="float16",
                  size=images, versions={"torch": "2.9.1", "diffusers": "0.36.0", "sdqueue": "0.10"},
                  compat_key="loop-768x768-77t", jobs=1, seconds=1.8, peak_memory_bytes=40 << 30,
                  started_at=utcnow(), finished_at=utcnow())
    with db.session() as session:
        session.add(batch)
    keys = [object_key_for(lease.job_id, index, lease.token) for index in range(images)]
    with db.session() as session:
        jobs.record_uploads(session, lease, keys)
    rows = [Image(job_id=lease.job_id, index=index, seed=index, object_key=key, sha256="0" * 64,
                  size_bytes=1_000_000, width=768, height=768, batch_id=batch.id, steps_run=25, shared_max=8,
                  shared_mean=6.5) for index, key in enumerate(keys)]
    with db.session() as session:
        jobs.succeed(session, lease, rows)


# -- S3 ----------------------------------------------------------------------------------------------

def noisy_png(side: int) -> bytes:
    """A side x side PNG, encoded as the worker encodes its images (the record embedded), of about the
    size of a real one: a smooth picture with noise."""
    from PIL import Image as PILImage

    from worker.encode import encode_png

    y, x = np.mgrid[0:side, 0:side] / side
    smooth = np.stack([128 + 90 * np.sin(6 * x + 3 * y), 128 + 90 * np.cos(5 * y), 128 + 60 * np.sin(4 * (x + y))],
                      axis=-1)
    noise = np.random.default_rng(side).integers(-NOISE, NOISE + 1, smooth.shape)
    pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    return encode_png(PILImage.fromarray(pixels), {"prompt": "a watercolour of a lighthouse at dusk", "seed": side,
                                                   "versions": {"torch": "2.9.1"}, "steps": 25})


def s3_part(args: argparse.Namespace, lines: list[str]) -> dict[str, Figure]:
    from tests.servers import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedServer, s3_client, weed_binary

    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = S3_ACCESS_KEY, S3_SECRET_KEY
    pngs = {side: noisy_png(side) for side in (512, 768)}
    version = subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout.split("\n")[0]
    lines.append(f"# S3: SeaweedFS `weed mini` on loopback ({version.strip()}), one process; PNGs of "
                 + ", ".join(f"{side}x{side} {len(png) / 1e3:,.0f} KB" for side, png in pngs.items()))
    figures: dict[str, Figure] = {}
    with tempfile.TemporaryDirectory(prefix="sdqueue-sizing-") as scratch, SeaweedServer(Path(scratch)) as server:
        # `weed mini` is one process (master, volume, filer and S3 server in it): found by its S3 port.
        weed = [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and _cmdline_has(p, f"-s3.port={server.s3_port}")]

        def server_cpu() -> dict[int, float]:
            return {pid: process_cpu(pid) for pid in weed}

        s3_client(server.endpoint).create_bucket(Bucket="sizing")
        # One storage (one boto3 client) per thread, as each worker has its own; each made and its
        # connection opened before the clock starts.
        storages = [open_storage("s3://sizing/sdqueue", endpoint_url=server.endpoint) for _ in range(max(args.threads))]
        for storage in storages:
            storage.ping()
        for repeat in range(args.repeat):
            for side, png in pngs.items():
                for threads in args.threads:
                    puts = scaled(args, 200 if side == 512 else 120)
                    keys = [object_key_for(str(uuid.uuid4()), 0, 1) for _ in range(puts)]
                    figures.setdefault(f"put{side}-{threads}", Figure(
                        "S3", f"PUT {side}x{side} ({len(png) / 1e6:.2f} MB), {threads} thread(s)", "PUTs/s",
                        object_bytes=len(png),
                    )).add(puts, *in_threads(storages[:threads], keys,
                                             lambda s, key, png=png: s.put(key, png, content_type="image/png"),
                                             server_cpu))
    return figures


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


# -- how many workers ------------------------------------------------------------------------------

def cases(figures: dict[str, Figure], operation: str) -> list[Figure]:
    """An operation's figures, one per thread count, fewest threads first."""
    return [figure for key, figure in figures.items() if key.split("-")[0] == operation]


def workers_table(args: argparse.Namespace, redis_f: dict[str, Figure], pg: dict[str, Figure],
                  s3: dict[str, Figure]) -> list[str]:
    cores = os.cpu_count() or 1
    lines = [f"# One worker: {args.images_per_s:g} images/s of 768x768; its heartbeat renews {HELD} leases every "
             f"{HEARTBEAT_SECONDS:g} s; {READS_PER_JOB} reads of each job's record by whoever follows it; events: "
             f"{STATE_EVENTS} state events a job, progress every {PROGRESS_INTERVAL:g} s for each job in its loop "
             f"({LOOP_IMAGES} images), a status every {STATUS_INTERVAL:g} s. Workers until saturation: measured = the "
             "best rate of each operation on this machine (clients beside the server: a floor); server-bound = the "
             f"server's CPU time per operation at the most threads, on 1 core (Redis) or {cores} (PostgreSQL, "
             "SeaweedFS)"]
    for per_job in (1, 4):
        rate = args.images_per_s / per_job
        in_loop = LOOP_IMAGES / per_job
        lines.append(f"{per_job} image(s) a job: {rate:.3g} jobs/s a worker")
        parts: list[tuple[str, str, float, float]] = []
        if redis_f:
            events = STATE_EVENTS * rate + in_loop / PROGRESS_INTERVAL + 1 / STATUS_INTERVAL
            load = [(rate, [redis_f["push"]]), (rate, [redis_f["take"]]), (events, [redis_f["event"]])]
            parts.append(("Redis", f"{rate:.3g} messages/s pushed and taken, {events:.3g} events/s",
                          *bounds(load, 1)))
        if pg:
            load = [(rate, cases(pg, "enqueue")), (rate, cases(pg, "claim")),
                    (1 / HEARTBEAT_SECONDS, cases(pg, "renew")), (rate, cases(pg, f"record{per_job}")),
                    (READS_PER_JOB * rate, cases(pg, "read"))]
            parts.append(("PostgreSQL", f"{rate:.3g} rows enqueued, claims and records/s, "
                          f"{1 / HEARTBEAT_SECONDS:g} renews/s, {READS_PER_JOB * rate:.3g} reads/s",
                          *bounds(load, cores)))
        if s3:
            puts = cases(s3, "put768")
            size = puts[0].object_bytes / 1e6
            load = [(args.images_per_s, puts)]
            parts.append(("S3", f"{args.images_per_s:g} PUTs/s, {args.images_per_s * size:.2f} MB/s",
                          *bounds(load, cores)))
        for part, what, measured, server in parts:
            lines.append(f"  {part:10} {what:68} saturates at {measured:6,.0f} workers "
                         f"({measured * rate:6,.0f} jobs/s) measured, {server:7,.0f} ({server * rate:7,.0f} jobs/s) "
                         "server-bound")
        for label, index in (("measured", 2), ("server-bound", 3)):
            first = min(parts, key=lambda p: p[index])
            lines.append(f"  first to saturate, {label}: {first[0]} at {first[index]:,.0f} workers "
                         f"({first[index] * args.images_per_s:,.0f} images/s)")
    return lines


def bounds(load: list[tuple[float, list[Figure]]], cores: int) -> tuple[float, float]:
    """Workers until the part saturates, from each operation's count per worker-second and its figures:
    measured (each operation's share of the part's time at its best rate, added up), and server-bound
    (the server's CPU time per operation with the most threads, as many workers at once, on `cores`)."""
    measured = 1 / sum(per_worker / max(figure.rate for figure in figures) for per_worker, figures in load)
    cpu = sum(per_worker * figures[-1].cpu_per_op for per_worker, figures in load)
    return measured, (cores / cpu if cpu > 0 else float("inf"))


# -- the run -----------------------------------------------------------------------------------------

def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal")) / 2**20
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {memory:.0f} GiB, {platform.system()} "
            f"{platform.release()}; a VM whose CPUs the benchmark's clients share with the servers, and other "
            f"work runs beside it (load average {os.getloadavg()[0]:.2f} at the start)")


PARTS = {"redis": redis_part, "postgresql": postgres_part, "s3": s3_part}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--images-per-s", type=float, default=4.5,
                        help="one worker's pace (an H100 on SD 2.1, 768x768)")
    parser.add_argument("--redis-url",
                        default=os.environ.get("SDQUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--quick", action="store_true", help="a tenth of the operations, one repeat")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.repeat = 1

    started = time.perf_counter()
    lines = [f"# sdqueue bench/sizing.py, {time.strftime('%Y-%m-%d %H:%M:%S')}", f"# {machine()}",
             f"# rates: median [min-max] of {args.repeat} repeat(s); server CPU: the server's own CPU time per "
             "operation, and what that makes on a core of its own"]
    print("\n".join(lines), flush=True)
    figures: dict[str, dict[str, Figure]] = {}
    for part, measure in PARTS.items():
        if part not in args.parts:
            continue
        notes: list[str] = []
        figures[part] = measure(args, notes)
        table = notes + [f.line() for f in figures[part].values()]
        print("\n".join(table), flush=True)
        lines += table
    table = workers_table(args, figures.get("redis", {}), figures.get("postgresql", {}), figures.get("s3", {}))
    table.append(f"# {time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.2f} at the end")
    print("\n".join(table), flush=True)
    write_results(args.out, "sizing", lines + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
