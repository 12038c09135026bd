"""The fault suite: real servers, real workers, real faults, and an audit of what survived.

    python -m tests.faults            # full: a few hundred jobs, 30 s outages, default lease timings
    python -m tests.faults --short    # the CI form (tests/test_faults.py): fewer jobs, short outages

It starts its own Redis, PostgreSQL (initdb on a free port) and SeaweedFS, and several `sdqueue
worker` processes on the tiny model, which it restarts when they die, as a supervisor would; their
spool lies on a small filesystem of its own (a tmpfs, where it may mount one), so that it fills.
Beside them it starts a broken worker (a module on its path that cannot be imported: a broken
image) and submits compel jobs, which that worker cannot run. It submits waves of jobs and, while
they run: kills a worker with SIGKILL mid-batch (holding bulk jobs that came several to a
message), delivers messages twice, cancels running jobs, revokes queued and running jobs through
Celery, restarts Redis empty, stops S3 (the spool's disk fills), stops PostgreSQL (with bulk jobs
running) and runs `sdqueue sweep` the moment it is back, and submits a poison job that kills
whichever worker runs it. Then it audits: every job succeeded, was cancelled or (the
poison job only) dead-lettered; none charged an attempt but the poison job (host faults are not
the jobs'); none stuck; none run to completion twice; each success one image per index, from one
claim; no object in S3 that no row references, no row whose object is missing, every object's
sha256 equal to its row's; no file left in the spool; no healthy worker quarantined. It prints the
time each recovery took.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import jobs  # noqa: E402
from models.constants import GENERATE_TASK, queue_for  # noqa: E402
from models.db import upgrade  # noqa: E402
from models.settings import load_settings  # noqa: E402
from models.sweep import Sweeper  # noqa: E402
from models.tables import Image, Job  # noqa: E402
from tests.servers import (  # noqa: E402
    LOOPBACK, S3_ACCESS_KEY, S3_SECRET_KEY, PostgresServer, RedisServer, SeaweedServer, s3_client, stop_process_group,
)

BUCKET = "faults"
POISON = "a poison pill that kills its worker"
# What a worker logs once a claim's images are stored and recorded: a job must never complete twice.
RECORDED = re.compile(r"job (\S+): claim (\d+) recorded")


@dataclass
class Config:
    workers: int = 3
    wave: int = 60  # jobs submitted before each fault
    outage: float = 30.0  # seconds S3 and PostgreSQL stay down
    settings: dict[str, str] = field(default_factory=dict)  # SDQUEUE_* for the workers (defaults otherwise)
    deadline: float = 1500.0  # seconds for everything to end
    broken_jobs: int = 0  # compel jobs submitted beside a broken worker (0: no broken worker)
    revokes: int = 0  # jobs revoked through Celery (half queued, half running)
    spool_disk: str = ""  # the size of the workers' spool filesystem (a tmpfs), e.g. "2m"; "": not limited
    # The healthy workers' model: "tiny" denoises on the CPU; "standin" (worker/standin.py) sleeps
    # its modelled time instead, so a worker starts in a second and the faults cost no CPU. The
    # broken worker always runs "tiny": its fault is compel's import.
    model: str = "tiny"

    @classmethod
    def full(cls) -> Config:
        return cls(broken_jobs=30, revokes=6, spool_disk="2m")

    @classmethod
    def short(cls) -> Config:
        return cls(workers=2, wave=25, outage=8.0, deadline=600.0, broken_jobs=12, revokes=4, spool_disk="2m",
                   model="standin", settings={
            # a 256x256 step of a full loop takes about 0.4 s: jobs are still running when a fault comes
            "SDQUEUE_STANDIN_SCALE": "20",
            "SDQUEUE_LEASE_SECONDS": "5", "SDQUEUE_HEARTBEAT_SECONDS": "1", "SDQUEUE_SWEEP_INTERVAL": "1.5",
            "SDQUEUE_REQUEUE_AFTER": "6", "SDQUEUE_MAX_ATTEMPTS": "2", "SDQUEUE_ORPHAN_GRACE": "30",
            "SDQUEUE_PROBE_INTERVAL": "2",
        })


@dataclass
class Report:
    submitted: int = 0
    states: Counter = field(default_factory=Counter)
    dead_lettered: list[str] = field(default_factory=list)
    poison_id: str = ""
    stuck: list[str] = field(default_factory=list)
    completed_twice: dict[str, int] = field(default_factory=dict)
    unreferenced_objects: list[str] = field(default_factory=list)
    missing_objects: list[str] = field(default_factory=list)
    sha_mismatches: list[str] = field(default_factory=list)
    image_sets_wrong: list[str] = field(default_factory=list)  # succeeded, but not one image per index from one claim
    worker_deaths: int = 0
    duplicates_sent: int = 0
    cancelled_running: list[str] = field(default_factory=list)
    cancelled_with_images: list[str] = field(default_factory=list)
    charged: list[str] = field(default_factory=list)  # jobs charged an attempt, the poison job aside
    broken_jobs: list[str] = field(default_factory=list)  # compel jobs submitted beside the broken worker
    broken_quarantined: bool = False  # the broken worker quarantined itself
    broken_exit: int | None = None  # its exit status on SIGTERM
    healthy_quarantined: list[str] = field(default_factory=list)  # log lines: a healthy worker quarantined
    revoked: list[str] = field(default_factory=list)
    revoked_not_cancelled: list[str] = field(default_factory=list)  # revoked, yet not cancelled with the reason
    spool_disk_full: int = 0  # jobs given back uncharged because the spool's disk was full (logged)
    spool_left: list[str] = field(default_factory=list)  # files left in the spool at the end
    sweep_after_outage: str = ""  # what `sdqueue sweep` printed, run the moment PostgreSQL was back
    rerun_after_outage: list[str] = field(default_factory=list)  # jobs running then, claimed again since
    poison_deaths: int = 0  # workers the poison job killed before it was dead-lettered
    recoveries: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        found = self.exactly_once_problems()
        if self.dead_lettered != [self.poison_id]:
            found.append(f"dead letters {self.dead_lettered} are not exactly the poison job {self.poison_id}")
        if not self.cancelled_running:
            found.append("no running job was cancelled")
        for name in ("charged", "healthy_quarantined", "revoked_not_cancelled", "spool_left", "rerun_after_outage"):
            if getattr(self, name):
                found.append(f"{name}: {getattr(self, name)}")
        if self.broken_jobs and not self.broken_quarantined:
            found.append("the broken worker did not quarantine itself")
        if self.broken_jobs and self.broken_exit != 0:
            found.append(f"the broken worker exited {self.broken_exit} on SIGTERM")
        if self.sweep_after_outage and "lease(s) requeued" not in self.sweep_after_outage:
            found.append(f"sdqueue sweep right after the outage did not finish: {self.sweep_after_outage}")
        return found

    def exactly_once_problems(self) -> list[str]:
        """What the audit found against "every job ended, and each that succeeded did so once"."""
        found = []
        ended = self.states["succeeded"] + self.states["cancelled"] + len(self.dead_lettered)
        if ended != self.submitted:
            found.append(f"submitted {self.submitted} != succeeded + cancelled + dead-lettered {ended} ({dict(self.states)})")
        for name in ("stuck", "completed_twice", "unreferenced_objects", "missing_objects", "sha_mismatches",
                     "image_sets_wrong", "cancelled_with_images"):
            if getattr(self, name):
                found.append(f"{name}: {getattr(self, name)}")
        return found

    def __str__(self) -> str:
        lines = [
            f"jobs submitted            {self.submitted}",
            f"  succeeded               {self.states['succeeded']}",
            f"  cancelled               {self.states['cancelled']} ({len(self.cancelled_running)} while running)",
            f"  dead-lettered           {len(self.dead_lettered)} (the poison job: {self.dead_lettered == [self.poison_id]})",
            f"  failed otherwise        {self.states['failed'] - len(self.dead_lettered)}",
            f"stuck (not ended)         {len(self.stuck)}",
            f"run to completion twice   {len(self.completed_twice)}",
            f"objects without a row     {len(self.unreferenced_objects)}",
            f"rows without an object    {len(self.missing_objects)}",
            f"sha256 mismatches         {len(self.sha_mismatches)}",
            f"image sets not one claim  {len(self.image_sets_wrong)}",
            f"duplicate messages sent   {self.duplicates_sent}",
            f"worker processes died     {self.worker_deaths} (restarted by the suite; {self.poison_deaths} by the poison job)",
            f"charged, not the poison   {len(self.charged)}",
            f"broken worker             {len(self.broken_jobs)} compel jobs beside it; quarantined: "
            f"{self.broken_quarantined}; exit on SIGTERM: {self.broken_exit}",
            f"healthy ones quarantined  {len(self.healthy_quarantined)}",
            f"revoked through Celery    {len(self.revoked)} ({len(self.revoked_not_cancelled)} not cancelled)",
            f"spool disk full           {self.spool_disk_full} job(s) given back for it; files left: {len(self.spool_left)}",
            f"sweep right after PG back {self.sweep_after_outage or '-'}",
            f"re-run after that sweep   {len(self.rerun_after_outage)} (of the jobs live workers held then)",
            "recovery:",
            *(f"  {name:38} {seconds:6.1f} s" for name, seconds in self.recoveries.items()),
            f"total                     {self.seconds:.0f} s",
            "RESULT: " + ("PASS" if not self.problems else "FAIL\n  " + "\n  ".join(self.problems)),
        ]
        return "\n".join(lines)


class Workers:
    """`sdqueue worker` processes, restarted when they die (as systemd or Kubernetes would)."""

    def __init__(self, count: int, env: dict[str, str], logdir: Path):
        self.env = env
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = [self._start(i) for i in range(count)]
        self.deaths = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _start(self, slot: int) -> subprocess.Popen:
        log = open(self.logdir / f"worker-{slot}.log", "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"],
                                    cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()

    def _supervise(self) -> None:
        while not self._stopping:
            for slot, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping:
                    self.deaths += 1
                    self.procs[slot] = self._start(slot)
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stopping = True
        self._thread.join()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("worker-*.log")))


def starter_png(size: int = 256) -> bytes:
    from PIL import Image as PILImage, ImageDraw

    img = PILImage.new("RGB", (size, size), (40, 70, 140))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 210, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wave(rng: random.Random, count: int, png: bytes) -> list[dict[str, Any]]:
    requests = []
    for i in range(count):
        request: dict[str, Any] = {
            "prompt": rng.choice(["a red fox", "a quiet harbour", "a (blue)++ house", "a tree at dusk"]),
            "width": rng.choice([256, 320]), "height": 256, "num_inference_steps": rng.choice([2, 3]),
            "num_images": rng.choice([1, 1, 2]), "guidance_scale": rng.choice([1.0, 7.5]), "seed": rng.randrange(10**6),
        }
        request["use_compel"] = "++" in request["prompt"]
        if i % 10 == 9:
            request.update(image=png, strength=0.6)
        requests.append(request)
    return requests


class Suite:
    def __init__(self, cfg: Config, workdir: Path, data_dir: Path | None, log: Callable[[str], None],
                 host: str = LOOPBACK):
        self.cfg = cfg
        self.host = host  # where the servers listen
        self.workdir = workdir
        self.data_dir = data_dir
        self.log = log
        self.rng = random.Random(6)
        self.report = Report()
        self.job_ids: list[str] = []
        self.png = starter_png()

    # --- helpers ---------------------------------------------------------------------------------

    def rows(self, *where: Any) -> list[Job]:
        with self.client.db.session() as session:
            return list(session.scalars(select(Job).where(*where)))

    def state_of(self, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
        with self.client.db.session() as session:
            return {j.id: (j.state, j.lease_owner) for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 300, step: float = 0.1) -> float:
        started = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - started
            except Exception:  # a server this fault stopped: ask again
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what}: not after {timeout:.0f} s")
            time.sleep(step)

    def submit_wave(self, bulk: bool = False) -> list[str]:
        """A wave of jobs: interactive ones one message each, or (`bulk`) bulk ones, several to a
        message (SDQUEUE_JOBS_PER_MESSAGE)."""
        requests = wave(self.rng, self.cfg.wave, self.png)
        ids = (self.client.submit_many(requests, priority="bulk") if bulk
               else [self.client.submit(r) for r in requests])
        self.job_ids += ids
        return ids

    def running(self, owner_pid: int | None = None) -> list[Job]:
        """Running jobs (of one worker process), the poison job aside: the faults below leave it alone."""
        found = self.rows(Job.state == "running", Job.id != self.report.poison_id)
        if owner_pid is not None:
            found = [j for j in found if j.lease_owner and f":{owner_pid}:" in j.lease_owner]
        return found

    def first_success_after(self, moment: float) -> Callable[[], bool]:
        from datetime import datetime, timezone

        since = datetime.fromtimestamp(moment, timezone.utc)
        return lambda: any(j.finished_at and jobs.aware(j.finished_at) > since for j in self.rows(Job.state == "succeeded"))

    # --- the run -------------------------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        spool = self.workdir / "spool"
        mounted = self.cfg.spool_disk and small_disk(spool, self.cfg.spool_disk, self.log)
        try:
            with RedisServer(self.workdir / "redis", host=self.host) as self.redis, \
                    PostgresServer(self.workdir / "postgres", host=self.host) as self.pg, \
                    SeaweedServer(self.workdir / "s3", host=self.host) as self.s3:
                self.setup()
                try:
                    self.faults()
                    self.wait("every job ended", lambda: not self.rows(Job.state.in_(("queued", "running"))),
                              timeout=self.cfg.deadline)
                except TimeoutError as exc:
                    self.log(f"!! {exc}")
                finally:
                    self.workers.stop()
                    self.audit()
                    self.client.close()
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(spool)], check=False)
        self.report.seconds = time.monotonic() - started
        return self.report

    def setup(self) -> None:
        from producer.client import Client

        s3_client(self.s3.endpoint).create_bucket(Bucket=BUCKET)
        database_url = self.pg.create_database("sdqueue")
        upgrade(database_url)
        data_dir = self.data_dir or self.workdir / "data"
        if not (data_dir / "models" / "tiny" / "model_index.json").is_file():
            subprocess.run([sys.executable, "-m", "producer.cli", "models", "build-tiny",
                            str(data_dir / "models" / "tiny")], cwd=ROOT, check=True, capture_output=True)
        self.env = {
            **os.environ,
            "SDQUEUE_BROKER_URL": self.redis.url, "SDQUEUE_DATABASE_URL": database_url,
            "SDQUEUE_STORAGE_URL": f"s3://{BUCKET}/run", "SDQUEUE_S3_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "SDQUEUE_MODEL": self.cfg.model, "SDQUEUE_DATA_DIR": str(data_dir), "SDQUEUE_DEVICE": "cpu",
            "SDQUEUE_SPOOL_DIR": str(self.workdir / "spool"), "SDQUEUE_WORKER_SLOTS": "8",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "SDQUEUE_TEST_POISON_PROMPT": POISON,
            # the spool's small disk fills for real: no margin kept, so writes run out of space
            **({"SDQUEUE_SPOOL_MIN_FREE_BYTES": "0"} if self.cfg.spool_disk else {}),
            **self.cfg.settings,
        }
        settings_env = {k.removeprefix("SDQUEUE_").lower(): v for k, v in self.env.items()
                        if k.startswith("SDQUEUE_") and k != "SDQUEUE_TEST_POISON_PROMPT"}
        os.environ.update({k: self.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        self.settings = load_settings(**settings_env)
        self.client = Client(self.settings)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.workers = self.start_workers()
        self.wait("workers ready", lambda: self.workers.logs().count(" ready.") >= self.cfg.workers, timeout=240)
        self.log(f"{self.cfg.workers} workers ready")

    def start_workers(self) -> Workers:
        return Workers(self.cfg.workers, self.env, self.workdir / "logs")

    def faults(self) -> None:
        cfg, report = self.cfg, self.report

        # 0. a broken worker beside the healthy ones: compel cannot be imported where it runs
        if cfg.broken_jobs:
            self.broken_worker()

        # 1. kill -9 of a worker mid-batch, holding bulk jobs that came several to a message; and the poison job
        self.submit_wave(bulk=True)
        poison = self.client.submit({"prompt": POISON, "width": 256, "height": 256, "num_inference_steps": 2})
        self.job_ids.append(poison)
        report.poison_id = poison
        poisoned = time.monotonic()
        pid = self.wait_for_busy_worker()
        victims = [j.id for j in self.running(pid)]
        self.workers.kill(pid)
        killed = time.monotonic()
        report.recoveries["kill -9: its jobs running again"] = self.wait(
            "killed worker's jobs taken over", lambda: all(
                state != "running" or (owner and f":{pid}:" not in owner)
                for state, owner in self.state_of(victims).values()), timeout=300)
        self.log(f"kill -9 of worker {pid} holding {len(victims)} job(s): recovered in "
                 f"{time.monotonic() - killed:.1f} s")
        self.wait("killed worker's jobs ended", lambda: all(
            state not in ("queued", "running") for state, _ in self.state_of(victims).values()), timeout=600)
        report.recoveries[f"kill -9: its {len(victims)} jobs ended (as suspects)"] = time.monotonic() - killed

        # 2. second deliveries of running and queued jobs
        ids = self.submit_wave()
        self.wait("jobs running", lambda: len(self.running()) >= 2)
        picked = [j.id for j in self.running()[:5]] + ids[-5:]
        for job_id in picked:
            self.client.sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=queue_for(self.settings.queue, "interactive", self.settings.default_model))
        report.duplicates_sent = len(picked)

        # 3. cancel three running jobs (a job that ends between the listing and its cancel is
        #    passed over for the next one running)
        tried: set[str] = set()
        while len(report.cancelled_running) < 3:
            self.wait("jobs running", lambda: any(j.id not in tried for j in self.running()))
            fresh = [j for j in self.running() if j.id not in tried]
            if not fresh:  # it ended since the wait saw it
                continue
            job = fresh[0]
            tried.add(job.id)
            try:
                self.client.cancel(job.id)
                report.cancelled_running.append(job.id)
            except jobs.IllegalTransition:
                pass  # it ended in between
        self.log(f"cancelled {len(report.cancelled_running)} running job(s)")

        # 3b. revoke queued and running jobs through Celery (as Flower or `celery control revoke` does)
        if cfg.revokes:
            self.revoke()

        # 4. Redis restarted empty while jobs wait
        ids = self.submit_wave()
        queued = [j.id for j in self.rows(Job.state == "queued", Job.id.in_(ids))]
        self.redis.kill()
        self.redis.start()
        report.recoveries["Redis restarted empty: queued jobs claimed"] = self.wait(
            "jobs queued before the Redis restart claimed",
            lambda: all(state != "queued" for state, _ in self.state_of(queued).values()), timeout=600)
        self.log(f"Redis restarted empty with {len(queued)} job(s) queued: recovered in "
                 f"{report.recoveries['Redis restarted empty: queued jobs claimed']:.1f} s")

        # 5. S3 away for `outage` seconds (the spool's disk fills), then 6. PostgreSQL (and
        #    `sdqueue sweep` run the moment it is back, as the deploy's sweep CronJob may)
        for name, server in (("S3", self.s3), ("PostgreSQL", self.pg)):
            self.submit_wave(bulk=server is self.pg)
            self.wait("jobs running", lambda: len(self.running()) >= 2)
            held = {j.id: (j.lease_token, j.lease_owner or "") for j in self.running()}
            server.stop()
            self.log(f"{name} stopped for {cfg.outage:.0f} s")
            time.sleep(cfg.outage)
            server.start()
            back = time.time()
            sweep = self.start_sweep() if server is self.pg else None
            report.recoveries[f"{name} down {cfg.outage:.0f} s: first success after"] = self.wait(
                f"a job succeeding after {name} came back", self.first_success_after(back), timeout=600)
            running_then = [j.id for j in self.running()]
            report.recoveries[f"{name} down {cfg.outage:.0f} s: jobs running then ended"] = self.wait(
                f"jobs running when {name} came back ended",
                lambda: all(state != "running" for state, _ in self.state_of(running_then).values()), timeout=600)
            self.log(f"{name} back: {report.recoveries[f'{name} down {cfg.outage:.0f} s: first success after']:.1f} s "
                     f"to the first success")
            if sweep is not None:
                self.sweep_after_outage(sweep, held)

        self.wait("the poison job dead-lettered", lambda: self.rows(Job.id == poison, Job.dead_letter.is_(True)),
                  timeout=600)
        deaths = self.workers.logs().count("the poison prompt: this worker process dies now")
        report.recoveries[f"poison job: dead-lettered ({deaths} deaths)"] = time.monotonic() - poisoned

    def broken_worker(self) -> None:
        """A worker whose image is broken (a module on its path raises ImportError: compel cannot
        load) beside the healthy ones, and compel jobs: it must quarantine itself and charge none."""
        report = self.report
        broken = self.workdir / "broken-image" / "pyparsing"
        broken.mkdir(parents=True, exist_ok=True)
        (broken / "__init__.py").write_text('raise ImportError("this host\'s image is broken: pyparsing (fault suite)")\n')
        log_path = self.workdir / "logs" / "broken-worker.log"
        env = {**self.env, "SDQUEUE_MODEL": "tiny", "PYTHONPATH": os.pathsep.join([str(broken.parent), str(ROOT)])}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"], cwd=ROOT,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # Its jobs go to tiny's queues, which only tiny's workers consume: where the healthy ones
        # run another model, a healthy tiny worker joins it, as a pool of that model would.
        helper = None
        if self.cfg.model != "tiny":
            helper_log = self.workdir / "logs" / "tiny-worker.log"
            with open(helper_log, "ab") as out:
                helper = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"],
                                          cwd=ROOT, env={**self.env, "SDQUEUE_MODEL": "tiny"}, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait("the broken worker ready", lambda: " ready." in log_path.read_text(errors="replace"), timeout=240)
            if helper is not None:
                self.wait("a healthy tiny worker ready", lambda: " ready." in helper_log.read_text(errors="replace"),
                          timeout=240)
            started = time.monotonic()
            # Only the jobs it counts: any more would wait for a tiny worker after the helper is gone.
            words = (["red", "green", "blue", "amber", "white", "violet"] * 10)[:self.cfg.broken_jobs]
            ids = [self.client.submit({"prompt": f"a ({word})++ lantern", "use_compel": True, "width": 256,
                                       "height": 256, "num_inference_steps": 2, "seed": i, "model": "tiny"})
                   for i, word in enumerate(words)]
            self.job_ids += ids
            report.broken_jobs = ids
            report.recoveries["broken worker: quarantined after"] = self.wait(
                "the broken worker quarantined", lambda: "quarantined:" in log_path.read_text(errors="replace"),
                timeout=300)
            report.broken_quarantined = True
            report.recoveries[f"broken worker: its {len(ids)} compel jobs ended"] = self.wait(
                "the compel jobs ended", lambda: all(state not in ("queued", "running")
                                                   for state, _ in self.state_of(ids).values()), timeout=600)
            self.log(f"broken worker quarantined; {len(ids)} compel jobs ended in "
                     f"{time.monotonic() - started:.1f} s")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                report.broken_exit = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                report.broken_exit = proc.wait()
            if helper is not None:
                stop_process_group(helper, timeout=120)

    def revoke(self) -> None:
        report = self.report
        ids = self.submit_wave()
        self.wait("jobs running", lambda: len(self.running()) >= 2)
        half = self.cfg.revokes // 2
        running = [j.id for j in self.running()[:half]]
        queued = [j.id for j in self.rows(Job.state == "queued", Job.id.in_(ids))][: self.cfg.revokes - len(running)]
        report.revoked = running + queued
        self.client.sender.control.revoke(report.revoked)
        report.recoveries["Celery revoke: jobs cancelled"] = self.wait(
            "revoked jobs cancelled", lambda: all(j.state in ("cancelled", "succeeded")
                                                  for j in self.rows(Job.id.in_(report.revoked))), timeout=120)
        self.log(f"revoked {len(running)} running and {len(queued)} queued job(s) through Celery")

    def start_sweep(self) -> subprocess.Popen:
        """`sdqueue sweep` the moment PostgreSQL is back, as the deploy's sweep CronJob may run it."""
        return subprocess.Popen([sys.executable, "-m", "producer.cli", "sweep"], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sweep_after_outage(self, sweep: subprocess.Popen, held: dict[str, tuple[int, str]]) -> None:
        """That sweep must take no lease of a live worker (theirs ran out while they could not renew
        them): the jobs live workers held then must not run again. Those of a worker that died
        meanwhile (the poison job) are rightly taken back."""
        out, err = sweep.communicate(timeout=600)
        self.report.sweep_after_outage = " / ".join(
            line for line in out.splitlines() if line.strip()) or f"exit {sweep.returncode}: {err[-300:]}"
        self.log(f"sdqueue sweep right after PostgreSQL came back: {self.report.sweep_after_outage}")
        alive = {f":{pid}:" for pid in self.workers.pids()}
        live = [job_id for job_id, (_, owner) in held.items() if any(pid in owner for pid in alive)]
        self.wait("jobs live workers held before the outage ended", lambda: all(
            j.state not in ("queued", "running") for j in self.rows(Job.id.in_(live))), timeout=600)
        self.report.rerun_after_outage = [j.id for j in self.rows(Job.id.in_(live)) if j.lease_token != held[j.id][0]]

    def wait_for_busy_worker(self) -> int:
        """The pid of a worker with running jobs."""
        found: dict[str, int] = {}

        def busy() -> bool:
            for pid in self.workers.pids():
                if len(self.running(pid)) >= 2:
                    found["pid"] = pid
                    return True
            return False

        self.wait("a worker with running jobs", busy, timeout=300, step=0.05)
        return found["pid"]

    # --- the audit -------------------------------------------------------------------------------------

    def audit(self) -> None:
        report = self.report
        report.submitted = len(self.job_ids)
        report.worker_deaths = self.workers.deaths
        logs = self.workers.logs()
        report.poison_deaths = logs.count("the poison prompt: this worker process dies now")
        report.healthy_quarantined = [line for line in logs.splitlines() if "quarantined:" in line]
        report.spool_disk_full = sum(1 for line in logs.splitlines()
                                     if "out of space" in line and "given back uncharged" in line)
        spool = self.workdir / "spool"
        report.spool_left = sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()
                                   and not p.name.endswith(".lock")) if spool.is_dir() else []
        # what no job references any more goes now (the workers are stopped: nothing is in flight)
        Sweeper(self.settings, self.client.db, self.client.storage, lambda ids, queue: None).sweep(
            expire=False, orphan_grace=0)
        with self.client.db.session() as session:
            all_jobs = list(session.scalars(select(Job).where(Job.id.in_(self.job_ids))))
            images = list(session.scalars(select(Image)))
        report.states = Counter(j.state for j in all_jobs)
        report.dead_lettered = [j.id for j in all_jobs if j.dead_letter]
        report.charged = [j.id for j in all_jobs if j.failures and j.id != report.poison_id]
        report.revoked_not_cancelled = [j.id for j in all_jobs if j.id in report.revoked and j.state != "succeeded"
                                        and not (j.state == "cancelled" and "revoked" in (j.error or ""))]
        report.stuck = [j.id for j in all_jobs if j.state in ("queued", "running")]
        report.image_sets_wrong = image_sets_wrong(all_jobs, images)
        completed = Counter(job_id for job_id, _claim in set(RECORDED.findall(self.workers.logs())))
        report.completed_twice = {job_id: n for job_id, n in completed.items() if n > 1}
        cancelled = {j.id for j in all_jobs if j.state == "cancelled"}
        report.cancelled_with_images = sorted({i.job_id for i in images if i.job_id in cancelled})
        # the bucket against the rows
        s3 = s3_client(self.s3.endpoint)
        objects: dict[str, str] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="run/"):
            for item in page.get("Contents", []):
                objects[item["Key"].removeprefix("run/")] = item["Key"]
        referenced = {i.object_key: i for i in images} | {j.input_key: None for j in all_jobs if j.input_key}
        report.unreferenced_objects = sorted(set(objects) - set(referenced))
        report.missing_objects = sorted(set(referenced) - set(objects))
        for key, image in referenced.items():
            if image is not None and key in objects:
                data = s3.get_object(Bucket=BUCKET, Key=objects[key])["Body"].read()
                if hashlib.sha256(data).hexdigest() != image.sha256:
                    report.sha_mismatches.append(key)


def small_disk(folder: Path, size: str, log: Callable[[str], None]) -> bool:
    """Mount a tmpfs of `size` at `folder` (root only); False, said once, where that is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        log(f"the spool's disk is not limited (mount: {done.stderr.strip() or done.returncode})")
        return False
    log(f"the workers' spool is a {size} tmpfs: it fills while S3 is down")
    return True


def image_sets_wrong(all_jobs: list[Job], images: list[Image]) -> list[str]:
    """Succeeded jobs whose recorded images are not exactly one per index, all made by one claim
    (object keys are images/JOB/CLAIM/INDEX.png): a job recorded twice would show here."""
    recorded: dict[str, list[Image]] = {}
    for image in images:
        recorded.setdefault(image.job_id, []).append(image)
    wrong = []
    for job in all_jobs:
        if job.state != "succeeded":
            continue
        made = recorded.get(job.id, [])
        claims = {image.object_key.split("/")[-2] for image in made}
        if sorted(image.index for image in made) != list(range(job.num_images)) or len(claims) != 1:
            wrong.append(job.id)
    return wrong


def run(cfg: Config, workdir: Path, data_dir: Path | None = None, log: Callable[[str], None] = print) -> Report:
    return Suite(cfg, workdir, data_dir, log).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI form: fewer jobs, 8 s outages, short leases")
    parser.add_argument("--workers", type=int, help="worker processes (default 3; 2 with --short)")
    parser.add_argument("--wave", type=int, help="jobs submitted before each fault (default 60; 25 with --short)")
    parser.add_argument("--outage", type=float, help="seconds S3 and PostgreSQL stay down (default 30; 8 with --short)")
    parser.add_argument("--dir", type=Path, help="keep servers' data and worker logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    cfg = Config.short() if args.short else Config.full()
    for name in ("workers", "wave", "outage"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="sdqueue-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"fault suite: {cfg.workers} workers, waves of {cfg.wave} jobs, {cfg.outage:.0f} s outages, in {workdir}")
    report = run(cfg, workdir, log=lambda line: print(f"  {line}", flush=True))
    print(report)
    if args.json:
        args.json.write_text(json.dumps({**report.__dict__, "states": dict(report.states),
                                         "problems": report.problems}, indent=1, default=str))
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
