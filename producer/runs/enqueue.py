"""A run's rows into the database and the broker: in batches, idempotent and resumable.

Order, per batch of rows: the img2img inputs to storage, the rows in one transaction (marked not
yet sent: `enqueued_at` is NULL), the messages pipelined through one connection, then the rows
marked sent. Every row of a run has a stable key, unique in the run; so whatever killed an earlier
enqueue (Ctrl-C, `kill -9`, a lost broker), running the same command again writes only the rows
that are missing, sends the rows written but never sent, and never makes a second job for a row.
A message sent twice costs its second delivery a look at the database (the lease decides), and
the sweeper sends what stays unsent for longer than SDQUEUE_REQUEUE_AFTER.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from models.constants import queue_for
from models.errors import InvalidRequest
from models.storage import input_key_for
from models.tables import Job, JobState, Priority, Run, utcnow
from producer.client import DRAWN_SEED_BOUND, Client, check_priority

if TYPE_CHECKING:
    from producer.runs.manifest import Manifest, RunRow

# Rows per transaction and per pipelined publish.
BATCH = 1000
# Room for "@" and a fire time after a schedule's name.
MAX_RUN_NAME = 200


@dataclass
class EnqueueReport:
    run: str
    run_id: str
    created: bool  # this call made the run (False: it existed, and was resumed)
    rows: int  # valid rows of the manifest
    existing: int  # of them, already jobs of the run before this call
    inserted: int  # jobs written now
    sent: int  # messages sent now (new jobs, and jobs an interrupted enqueue wrote but did not send)
    seconds: float

    @property
    def rate(self) -> float:
        return self.inserted / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        verb = "created" if self.created else "resumed"
        return (f"run {self.run} {verb}: {self.inserted} job(s) enqueued in {self.seconds:.1f} s "
                f"({self.rate:,.0f} jobs/s), {self.existing} already there, {self.sent} message(s) sent")


def check_run_name(name: str) -> str:
    if not name or len(name) > MAX_RUN_NAME or not name.isprintable() or name != name.strip():
        raise InvalidRequest([f"name={name[:60]!r}: a run's name must be 1..{MAX_RUN_NAME} printable characters, "
                              "with no leading or trailing spaces"])
    return name


def enqueue_run(
    client: Client,
    name: str,
    manifest: Manifest,
    *,
    defaults: dict[str, Any] | None = None,
    priority: str = Priority.BULK.value,
    schedule: str | None = None,
    fire_time: datetime | None = None,
    only_if_new: bool = False,
    progress: bool | None = None,
    batch_size: int = BATCH,
) -> EnqueueReport | None:
    """Make (or resume) the run `name` with the valid rows of `manifest`.

    With `only_if_new`, a run that exists already is left alone and None is returned: the loser
    of a race to make it (two schedulers firing the same slot) does nothing.
    """
    # 1. checks before any write: the name, the priority, a broker we can send to
    check_run_name(name)
    check_priority(priority)
    client.sender  # noqa: B018  (refuses the in-process broker)
    started = time.monotonic()
    # 2. the run: made now, or found
    run_id, created = _make_run(client, name, manifest, defaults or {}, priority, schedule, fire_time)
    if not created and only_if_new:
        return None
    with client.db.session() as session:
        existing = set(session.scalars(select(Job.run_key).where(Job.run_id == run_id)))
    # 3. jobs an interrupted enqueue wrote but never sent
    sent = _send_unsent(client, run_id)
    # 4. the rows that are missing, batch by batch
    missing = [row for row in manifest.rows if row.key not in existing]
    inserted = 0
    with _progress_bar(len(missing), name, progress) as bar:
        for start in range(0, len(missing), batch_size):
            rows = missing[start : start + batch_size]
            written = _write(client, run_id, rows, priority)
            sent += send_marked(client, written)
            inserted += sum(len(ids) for ids in written.values())
            bar.update(len(rows))
    # 5. sealed: every row of this manifest is a job of the run, and sent
    with client.db.session() as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.expected_jobs = max(run.expected_jobs or 0, len(manifest.rows))
        run.sealed_at = utcnow()
    return EnqueueReport(name, run_id, created, len(manifest.rows), len(manifest.rows) - len(missing), inserted, sent,
                         time.monotonic() - started)


def _make_run(client: Client, name: str, manifest: Manifest, defaults: dict[str, Any], priority: str,
              schedule: str | None, fire_time: datetime | None) -> tuple[str, bool]:
    """The run's id, and whether this call made it; a race to make it has one winner."""
    run_id = str(uuid.uuid4())
    values = dict(id=run_id, name=name, source=manifest.source, source_sha256=manifest.sha256, defaults=defaults,
                  priority=priority, schedule=schedule, fire_time=fire_time, expected_jobs=len(manifest.rows),
                  created_at=utcnow())
    with client.db.session() as session:
        made = session.execute(_insert(session, Run).values(**values).on_conflict_do_nothing(
            index_elements=["name"]).returning(Run.id)).scalar_one_or_none()
        if made is not None:
            return made, True
        found = session.scalar(select(Run.id).where(Run.name == name))
        assert found is not None
        return found, False


def _write(client: Client, run_id: str, rows: list[RunRow], priority: str) -> dict[str, list[str]]:
    """Write one batch of rows (inputs first); returns the ids written, by queue. A row whose key
    another enqueue wrote meanwhile is skipped, not doubled."""
    now = utcnow()
    values = []
    for row in rows:
        request = row.request
        job_id = str(uuid.uuid4())
        seed = request.seed if request.seed is not None else secrets.randbelow(DRAWN_SEED_BOUND)
        input_key = input_sha256 = None
        if request.image is not None:
            input_key = input_key_for(job_id)
            input_sha256 = hashlib.sha256(request.image).hexdigest()
            client.storage.put(input_key, request.image)
        row_priority = row.priority or priority
        values.append(dict(
            id=job_id, state=JobState.QUEUED.value, mode=request.mode, params={**request.parameters(), "seed": seed},
            seed=seed, seed_was_drawn=request.seed is None, width=request.width, height=request.height,
            num_inference_steps=request.num_inference_steps, num_images=request.num_images, input_key=input_key,
            input_sha256=input_sha256, queue=queue_for(client.settings.queue, row_priority), enqueued_at=None,
            priority=row_priority, run_id=run_id, run_key=row.key, created_at=now, updated_at=now,
            attempts=0, failures=0, dead_letter=False, lease_token=0, suspect=False, running_alone=False,
        ))
    with client.db.session() as session:
        if session.get_bind().dialect.name == "postgresql":
            written = _copy_in(session, values)
        else:
            statement = _insert(session, Job).on_conflict_do_nothing(index_elements=["run_id", "run_key"])
            written = set(session.scalars(statement.returning(Job.id), values))
    by_queue: dict[str, list[str]] = defaultdict(list)
    for value in values:
        if value["id"] in written:
            by_queue[value["queue"]].append(value["id"])
    return by_queue


def _copy_in(session: Any, values: list[dict[str, Any]]) -> set[str]:
    """PostgreSQL: the rows through COPY into a temporary table, then into jobs with ON CONFLICT
    DO NOTHING. A multi-row INSERT of the same rows spends most of its time in the driver, turning
    20,000 named parameters into positional ones."""
    columns = list(values[0])
    names = ", ".join(f'"{c}"' for c in columns)
    cursor = session.connection().connection.driver_connection.cursor()
    cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS run_rows ON COMMIT DELETE ROWS AS "
                   f"SELECT {names} FROM jobs WITH NO DATA")
    with cursor.copy(f"COPY run_rows ({names}) FROM STDIN") as copy:
        for value in values:
            copy.write_row([json.dumps(value[c]) if c == "params" else value[c] for c in columns])
    cursor.execute(f"INSERT INTO jobs ({names}) SELECT {names} FROM run_rows "
                   "ON CONFLICT (run_id, run_key) DO NOTHING RETURNING id")
    return {row[0] for row in cursor.fetchall()}


def send_marked(client: Client, by_queue: dict[str, list[str]]) -> int:
    """Send the messages of rows not yet sent, then mark them sent, a batch at a time; returns
    how many were sent."""
    sent = 0
    for queue, job_ids in by_queue.items():
        for start in range(0, len(job_ids), BATCH):
            chunk = job_ids[start : start + BATCH]
            client.send(chunk, queue)
            with client.db.session() as session:
                session.execute(update(Job).where(Job.id.in_(chunk), Job.enqueued_at.is_(None))
                                .values(enqueued_at=utcnow()))
            sent += len(chunk)
    return sent


def _send_unsent(client: Client, run_id: str) -> int:
    with client.db.session() as session:
        unsent = session.execute(
            select(Job.id, Job.queue).where(Job.run_id == run_id, Job.state == JobState.QUEUED.value,
                                            Job.enqueued_at.is_(None))
        ).all()
    by_queue: dict[str, list[str]] = defaultdict(list)
    for job_id, queue in unsent:
        by_queue[queue or client.settings.queue].append(job_id)
    return send_marked(client, by_queue)


def _insert(session: Any, table: Any) -> Any:
    """INSERT with ON CONFLICT DO NOTHING, in the dialect at hand (PostgreSQL or SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(total: int, name: str, show: bool | None) -> Any:
    """tqdm on stderr (rate, ETA) when it is a terminal, or when asked."""
    if show is None:
        show = sys.stderr.isatty()
    if not show or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"enqueue {name}", unit="job", unit_scale=True, file=sys.stderr)
