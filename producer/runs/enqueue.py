"""A run's rows into the database and the broker: in batches, idempotent and resumable.

Order, per batch of rows: the img2img inputs to storage, the rows in one transaction (all with
one `created_at`), the messages pipelined through one connection, then the run's `sent_through`
set to that `created_at`: the run's queued rows created after it were written but not sent. (An
UPDATE of each batch's rows to mark them sent rewrote every row and its entries in every index:
more than half of a million-row enqueue.) A thread of its own writes and sends each batch while
the next one is read and made into rows: the database's and the broker's waits overlap the
manifest's parsing, and one batch at most is in flight, so memory stays flat.

Every row of a run has a stable key, unique in the run; so whatever killed an earlier
enqueue (Ctrl-C, `kill -9`, a lost broker), running the same command again writes only the rows
that are missing, sends the rows written but never sent, and never makes a second job for a row.
A message sent twice costs its second delivery a look at the database (the lease decides), and
the sweeper sends what stays unsent for longer than SDQUEUE_REQUEUE_AFTER.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sqlalchemy import or_, select, text, update

from models.db import dialect_insert
from models.errors import InvalidRequest, RunExists
from models.tables import Job, JobState, Priority, Run, utcnow
from models.request import After
from producer.bulk import BATCH, by_queue, insert_jobs, job_row, send_batches
from producer.runs.manifest import THEN_KEY
from producer.client import Client, check_priority

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from producer.runs.manifest import Manifest, RunRow

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
    append: bool = False,
    progress: bool | None = None,
    batch_size: int = BATCH,
    api_key_id: str | None = None,
    admit: Callable[[Session, int], None] | None = None,
) -> EnqueueReport | None:
    """Make (or resume) the run `name` with the valid rows of `manifest`.

    With `only_if_new`, a run that exists already is left alone and None is returned: the loser
    of a race to make it (two schedulers firing the same slot) does nothing. A run that exists
    is resumed only if it was made from the same source and defaults (RunExists otherwise), or
    with `append`, which adds the rows it lacks whatever they came from.

    `api_key_id`: the API key the run and its jobs belong to (None: the operator's, the CLI's and
    the schedules'); a run of that name made by another owner is RunExists, whatever its source.
    `admit`: called in each batch's transaction before its rows are inserted, with how many there
    are; what it raises refuses that batch (the API counts a key's cap of queued jobs there).
    """
    # 1. checks before any write: the name, the priority, a broker we can send to
    check_run_name(name)
    check_priority(priority)
    client.sender  # noqa: B018  (refuses the in-process broker)
    started = time.monotonic()
    # 2. the run: made now, or found (the same source and defaults, unless appending)
    run_id, created = _make_run(client, name, manifest, defaults or {}, priority, schedule, fire_time,
                                 append=append or only_if_new, api_key_id=api_key_id)
    if not created and only_if_new:
        return None
    # 3. jobs an interrupted enqueue wrote but never sent
    sent = _send_unsent(client, run_id)
    # 4. the rows that are missing, batch by batch, as the manifest is read again: memory stays flat
    existing = inserted = follow_ups = 0
    writing: Future[dict[str, list[str]]] | None = None  # the batch being written and sent

    def written() -> None:
        nonlocal sent, inserted, writing
        if writing is not None:
            count = sum(len(ids) for ids in writing.result().values())  # each job written is sent
            sent += count
            inserted += count
            writing = None

    with _progress_bar(len(manifest.rows), name, progress) as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="sdqueue-enqueue") as writer:
        for rows in _batches(manifest.rows, batch_size):
            # A run made now has no rows to find (a second enqueue racing it is skipped by the insert).
            missing = rows if created else _missing(client, run_id, rows)
            existing += len(rows) - len(missing)
            follow_ups += sum(row.request.num_images for row in rows if row.then is not None)
            if missing:
                values = _values(client, run_id, missing, priority, api_key_id)
                written()  # the batch before: written and sent (or its error raised) before this one goes
                writing = writer.submit(_write_and_send, client, run_id, values, admit)
            bar.update(len(rows))
        written()
    # 5. sealed: every row of this manifest is a job of the run, and sent
    with client.db.session() as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.expected_jobs = max(run.expected_jobs or 0, len(manifest.rows) + follow_ups)
        run.sealed_at = utcnow()
    return EnqueueReport(name, run_id, created, len(manifest.rows), existing, inserted, sent,
                         time.monotonic() - started)


def _batches(rows: Iterable[RunRow], size: int) -> Iterator[list[RunRow]]:
    batch: list[RunRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _missing(client: Client, run_id: str, rows: list[RunRow]) -> list[RunRow]:
    """The rows of the batch that are not jobs of the run yet."""
    keys = [row.key for row in rows]
    with client.db.session() as session:
        if session.get_bind().dialect.name == "postgresql":
            # One probe of the (run_id, run_key) index per key: an IN list lets the planner, with
            # statistics from before this run grew, scan all of the run's rows for every batch.
            found = set(session.scalars(text(
                "SELECT k FROM unnest(CAST(:keys AS text[])) AS k "
                "WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.run_id = :run AND jobs.run_key = k)"),
                {"keys": keys, "run": run_id}))
        else:
            found = set(session.scalars(select(Job.run_key).where(Job.run_id == run_id, Job.run_key.in_(keys))))
    return [row for row in rows if row.key not in found]


def _make_run(client: Client, name: str, manifest: Manifest, defaults: dict[str, Any], priority: str,
              schedule: str | None, fire_time: datetime | None, *, append: bool,
              api_key_id: str | None) -> tuple[str, bool]:
    """The run's id, and whether this call made it; a race to make it has one winner. A run found
    must be the same owner's, made from the same source and defaults unless `append`."""
    run_id = str(uuid.uuid4())
    values = dict(id=run_id, name=name, source=manifest.source, source_sha256=manifest.sha256, defaults=defaults,
                  priority=priority, schedule=schedule, fire_time=fire_time, expected_jobs=len(manifest.rows),
                  api_key_id=api_key_id, created_at=utcnow())
    with client.db.session() as session:
        made = session.execute(dialect_insert(session, Run).values(**values).on_conflict_do_nothing(
            index_elements=["name"]).returning(Run.id)).scalar_one_or_none()
        if made is not None:
            return made, True
        found = session.scalars(select(Run).where(Run.name == name)).one()
        _check_owner(found, api_key_id)
        if not append:
            _check_same_run(found, manifest, defaults)
        return found.id, False


def check_run(client: Client, name: str, manifest: Manifest, defaults: dict[str, Any], *, append: bool = False,
              api_key_id: str | None = None) -> None:
    """Before anything is written: RunExists if a run of that name is another owner's, or was
    made from another source or other defaults (and not `append`)."""
    check_run_name(name)
    with client.db.session() as session:
        found = session.scalars(select(Run).where(Run.name == name)).one_or_none()
        if found is not None:
            _check_owner(found, api_key_id)
            if not append:
                _check_same_run(found, manifest, defaults)


def _check_owner(run: Run, api_key_id: str | None) -> None:
    """Only who made a run resumes or appends to it. The refusal names no owner: an API key must
    not learn which key (or whether the operator) holds a name."""
    if run.api_key_id != api_key_id:
        raise RunExists(f"the run name {run.name!r} is taken: give another name")


def _check_same_run(run: Run, manifest: Manifest, defaults: dict[str, Any]) -> None:
    """A run's identity is its source and its defaults: the same command again resumes it; a
    different file, or the same one with other options, is refused rather than mixed in."""
    differs = []
    if run.source_sha256 != manifest.sha256:
        was = f"{run.source or 'an inline grid'} (sha256 {(run.source_sha256 or '-')[:12]})"
        now = f"{manifest.source or 'an inline grid'} (sha256 {(manifest.sha256 or '-')[:12]})"
        differs.append(f"its source was {was}, this is {now}")
    if (run.defaults or {}) != defaults:
        differs.append(f"its defaults were {_options(run.defaults or {})}, these are {_options(defaults)}")
    if differs:
        raise RunExists(f"run {run.name!r} exists and {'; '.join(differs)}: give another --name, or --append "
                        "to add these rows to it")


def _options(defaults: dict[str, Any]) -> str:
    """Defaults as the options that gave them: --num-inference-steps 30 --width 512, or "none"."""
    given = [f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
             for name, value in sorted(defaults.items())]
    return " ".join(given) or "none"


def _values(client: Client, run_id: str, rows: list[RunRow], priority: str,
            api_key_id: str | None) -> list[dict[str, Any]]:
    """The job rows of one batch of the manifest's rows (their img2img inputs stored first), all
    created (and to be sent) at one time."""
    now = utcnow()
    values = []
    for row in rows:
        common = {"settings": client.settings, "priority": row.priority or priority, "storage": client.storage,
                  "now": now, "run_id": run_id, "api_key_id": api_key_id, "enqueued_at": now}
        values.append(job_row(row.request, run_key=row.key, **common))
        if row.then is not None:  # a follow-up of each image, waiting for the row's job, in its transaction
            parent = values[-1]["id"]
            values += [job_row(row.then.model_copy(update={"after": After(job=parent, index=index)}),
                               run_key=row.key + THEN_KEY.format(index=index), **common)
                       for index in range(row.request.num_images)]
    return values


def _write_and_send(client: Client, run_id: str, values: list[dict[str, Any]],
                    admit: Callable[[Session, int], None] | None) -> dict[str, list[str]]:
    """Write one batch's rows, send their messages, then move the run's `sent_through` up to them;
    returns the ids written, by queue. A row whose key another enqueue wrote meanwhile is skipped,
    not doubled."""
    with client.db.session() as session:
        if admit is not None:
            admit(session, len(values))
        ids = by_queue(values, insert_jobs(session, values))
    send_batches(client, ids, mark=False)
    created = values[0]["created_at"]
    with client.db.session() as session:
        session.execute(update(Run).where(Run.id == run_id, or_(Run.sent_through.is_(None), Run.sent_through < created))
                        .values(sent_through=created))
    return ids


def _send_unsent(client: Client, run_id: str) -> int:
    """Send the run's queued rows an interrupted enqueue wrote but did not send: those created after
    the run's `sent_through` (and any not marked sent the way an older sdqueue marked them)."""
    with client.db.session() as session:
        through = session.scalar(select(Run.sent_through).where(Run.id == run_id))
        unsent = session.execute(
            select(Job.id, Job.queue).where(Job.run_id == run_id, Job.state == JobState.QUEUED.value,
                                            or_(Job.enqueued_at.is_(None), Job.created_at > through)
                                            if through is not None else True)
        ).all()
    grouped: dict[str, list[str]] = defaultdict(list)
    for job_id, queue in unsent:
        grouped[queue or client.settings.queue].append(job_id)
    return send_batches(client, grouped, mark=True)


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
