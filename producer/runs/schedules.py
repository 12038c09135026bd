"""Cron schedules, each firing one run, fired by Celery beat (`sdqueue beat`).

A schedules file is TOML: one `[[schedule]]` table per schedule, with a cron expression read in
the schedule's time zone and what each firing enqueues (a manifest path or an inline grid).
Firing the slot T of schedule S makes the run `S@T` (T in S's zone, with its offset) with
`only_if_new`: the run's name is unique in the database, so a slot is enqueued once however many
`sdqueue beat` run, and a restart never repeats one. The database, not a shelve file, is the
scheduler's state: at start the latest fire time of each schedule's runs says which slots were
missed while no scheduler ran, and `catch_up` says which of them to fire.

The slot arithmetic takes `now` as an argument (`Schedule.slots_between`, `Schedule.missed`,
`Firings`), so catch-up and DST can be checked without waiting for a clock. Croniter and Celery
are imported where they are used: `sdqueue schedules list` and the CLI's start stay light.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from models.errors import BadInput, SdqueueError
from models.text import inert

if TYPE_CHECKING:
    from models.db import Database
    from producer.client import Client
    from producer.runs.enqueue import EnqueueReport
    from producer.runs.manifest import Manifest

logger = logging.getLogger("sdqueue.schedules")

CATCH_UP = ("skip", "latest", "all")
KEYS = ("name", "cron", "timezone", "priority", "catch_up", "manifest", "grid", "defaults")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A run's name is the schedule's, "@" and a fire time of 25 characters: well within a run name.
MAX_NAME = 100
# `catch_up = "all"` fires at most this many missed slots at start, the most recent ones: a
# seconds-cron left for a week would otherwise enqueue 300,000 runs.
MAX_CATCH_UP = 1000
# A schedules file is a few tables: read at most this much of one.
MAX_SCHEDULES_BYTES = 1 << 20
# A firing that met an outage (database, broker, storage) is tried again this long after.
RETRY_SECONDS = 5.0
# Beat sleeps at most this long between looks at the clock (a clock that jumps is seen then).
MAX_INTERVAL = 30.0


class ScheduleError(BadInput):
    """A schedules file that cannot be used, or a firing refused (a manifest with bad rows)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    timezone: str
    priority: str
    catch_up: str
    manifest: str | None  # a path relative to the schedules file, with placeholders
    grid: dict[str, Any] | None  # the inline grid's TOML keys
    defaults: dict[str, Any]
    file: Path  # the schedules file

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # zoneinfo keeps one instance per key

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    def local(self, slot: datetime) -> datetime:
        """The slot in the schedule's zone, seconds precision (the fold of an ambiguous time set)."""
        return slot.astimezone(self.zone).replace(microsecond=0)

    def run_name(self, slot: datetime) -> str:
        return f"{self.name}@{self.local(slot).isoformat()}"

    # -- slots --------------------------------------------------------------------------------
    def slots_after(self, after: datetime) -> Iterator[datetime]:
        """The slots strictly after `after`, in order, as aware datetimes in the schedule's zone.

        Croniter reads the expression in the zone: a local time that does not exist (spring
        forward) is shifted as croniter shifts it, and one that shifts onto a slot already given
        is not given twice; a local time that exists twice (fall back) fires once, at its first
        occurrence.
        """
        from croniter import croniter

        start = self.local(after)
        if _repeated_wall_time(start):
            # croniter reads its start as a wall time, and a repeated one as its first occurrence:
            # start there, and skip what is not after `after`
            start = start.replace(fold=0)
        it = croniter(self.cron, start, second_at_beginning=False)
        # compared in UTC: two times of one zone compare as wall times, blind to the fold
        last = after.astimezone(timezone.utc)
        while True:
            slot = self.local(it.get_next(datetime))
            if slot.astimezone(timezone.utc) <= last or _repeated_wall_time(slot):
                continue
            last = slot.astimezone(timezone.utc)
            yield slot

    def slots_between(self, after: datetime, until: datetime, limit: int | None = None) -> list[datetime]:
        """The slots in (after, until], in order; with `limit`, only the last `limit` of them.

        With a limit the search starts near `until` and widens, so a seconds-cron far behind
        costs what its last `limit` slots cost, not every slot since `after`.
        """
        after, until = after.astimezone(timezone.utc), until.astimezone(timezone.utc)
        if until <= after:
            return []
        if limit is None:
            return list(itertools.takewhile(lambda slot: slot <= until, self.slots_after(after)))
        window = timedelta(minutes=1)
        while True:
            start = max(after, until - window)
            found = []
            for slot in self.slots_after(start):
                if slot > until:
                    break
                found.append(slot)
            if len(found) >= limit or start == after:
                return found[-limit:] if limit else []
            window *= 4

    def missed(self, last: datetime | None, now: datetime) -> list[datetime]:
        """The slots of (last, now] that catch_up fires at start; none when nothing ran before."""
        if last is None or self.catch_up == "skip":
            return []
        limit = 1 if self.catch_up == "latest" else MAX_CATCH_UP
        slots = self.slots_between(last, now, limit)
        if limit == MAX_CATCH_UP == len(slots) and self.slots_between(last, slots[0] - timedelta(microseconds=1), 1):
            logger.warning("schedule %s: more than %d firings were missed since %s: only the last %d fire",
                           self.name, MAX_CATCH_UP, self.local(last).isoformat(), MAX_CATCH_UP)
        return slots

    def next_fire_times(self, count: int, now: datetime | None = None) -> list[datetime]:
        slots = self.slots_after(now or utcnow())
        return [next(slots) for _ in range(count)]

    # -- what a firing enqueues -----------------------------------------------------------------
    @property
    def what(self) -> str:
        if self.manifest is not None:
            return f"manifest {self.manifest}"
        assert self.grid is not None
        return "grid " + json.dumps(self.grid, sort_keys=True, default=str, ensure_ascii=False)

    def manifest_for(self, slot: datetime, grid: dict[str, Any] | None = None, settings: Any = None) -> Manifest:
        """The slot's manifest: the file its placeholders name, or the inline grid (or `grid`
        in its place) at its time; its rows' models checked against `settings`."""
        from producer.runs.manifest import fill_placeholders, load_grid, load_manifest

        fire_time = self.local(slot)
        if self.manifest is not None:
            where = f"schedule {self.name!r}: manifest"
            path = self.base_dir / fill_placeholders(self.manifest, fire_time, self.name, where=where)
            return load_manifest(path, self.defaults or None, fire_time=fire_time, schedule=self.name,
                                 settings=settings)
        grid = grid or self.grid
        assert grid is not None
        spec = json.dumps(grid, sort_keys=True, default=str).encode()
        return load_grid(grid, self.base_dir, self.defaults or None, fire_time=fire_time, schedule=self.name,
                         source=self.grid_source, sha256=hashlib.sha256(spec).hexdigest(), settings=settings)

    @property
    def grid_source(self) -> str:
        """What a run of the inline grid records as its source."""
        return f"{self.file}#{self.name}"


def _repeated_wall_time(local: datetime) -> bool:
    """The second occurrence of a wall time that a fall-back hour repeats."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


# -- the schedules file ---------------------------------------------------------------------------
def load_schedules(path: Path | str, *, check_sources: bool = True, settings: Any = None) -> list[Schedule]:
    """Read and validate a schedules file; ScheduleError names the schedule and what is wrong.

    With `check_sources`, each grid is built and each manifest path filled for the next slot, so a
    bad grid or placeholder is refused at start rather than at 2 a.m.
    """
    from producer.files import UnreadableFile, read_bounded
    from producer.runs.manifest import parse_toml

    path = Path(path)
    try:
        text = read_bounded(path, MAX_SCHEDULES_BYTES)
    except UnreadableFile as exc:
        raise ScheduleError(f"schedules file {str(path)!r} {exc}") from None
    data = parse_toml(path, text, lambda message: ScheduleError(
        f"schedules file {str(path)!r} is not valid TOML: {message.removeprefix(f'{path}: ')}"))
    unknown = sorted(set(data) - {"schedule"})
    if unknown:
        raise ScheduleError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}: "
                            "schedules are [[schedule]] tables")
    tables = data.get("schedule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ScheduleError(f"{path}: 'schedule' must be an array of tables ([[schedule]])")
    if not tables:
        raise ScheduleError(f"{path}: no [[schedule]] tables")
    schedules: list[Schedule] = []
    seen: set[str] = set()
    for number, table in enumerate(tables, 1):
        schedule = parse_schedule(table, path, number)
        if schedule.name in seen:
            raise ScheduleError(f"{path}: schedule {schedule.name!r}: the name is used twice (names are unique)")
        seen.add(schedule.name)
        if check_sources:
            check_source(schedule, settings)
        schedules.append(schedule)
    return schedules


def parse_schedule(table: dict[str, Any], path: Path, number: int) -> Schedule:
    """One [[schedule]] table, checked key by key."""
    from croniter import croniter

    from models.tables import Priority

    name = table.get("name")
    where = f"{path}: schedule {name!r}" if isinstance(name, str) and name else f"{path}: schedule #{number}"

    def bad(message: str) -> ScheduleError:
        return ScheduleError(f"{where}: {message}")

    # 1. keys and name
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(KEYS)})")
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise bad(f"name={name!r}: needs a name of 1..{MAX_NAME} characters from A-Z a-z 0-9 _ . -")
    # 2. cron: 5 fields, or 6 with seconds last
    cron = table.get("cron")
    if not isinstance(cron, str) or len(cron.split()) not in (5, 6):
        raise bad(f"cron={cron!r}: needs a cron expression of 5 fields (minute hour day month weekday), "
                  "or 6 with seconds last")
    cron = " ".join(cron.split())
    if not croniter.is_valid(cron, second_at_beginning=False):
        raise bad(f"cron={cron!r} is not a valid cron expression")
    # 3. zone, priority, catch_up
    zone_name = table.get("timezone", "UTC")
    try:
        if not isinstance(zone_name, str):
            raise ValueError
        ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(f"timezone={zone_name!r} is not an IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
    priorities = [p.value for p in Priority]
    priority = table.get("priority", Priority.BULK.value)
    if priority not in priorities:
        raise bad(f"priority={priority!r}: must be one of {', '.join(priorities)}")
    catch_up = table.get("catch_up", "skip")
    if catch_up not in CATCH_UP:
        raise bad(f"catch_up={catch_up!r}: must be one of {', '.join(CATCH_UP)}")
    # 4. what it enqueues: a manifest path or a grid, not both
    manifest, grid = table.get("manifest"), table.get("grid")
    if (manifest is None) == (grid is None):
        raise bad("needs either manifest = \"PATH\" or a [schedule.grid] table" +
                  (", not both" if manifest is not None else ""))
    if manifest is not None and (not isinstance(manifest, str) or not manifest.strip()):
        raise bad(f"manifest={manifest!r}: must be a path (relative to the schedules file)")
    if grid is not None and not isinstance(grid, dict):
        raise bad("grid must be a table ([schedule.grid])")
    defaults = table.get("defaults", {})
    if not isinstance(defaults, dict):
        raise bad("defaults must be a table of request fields ([schedule.defaults])")
    schedule = Schedule(name=name, cron=cron, timezone=zone_name, priority=priority, catch_up=catch_up,
                        manifest=manifest, grid=grid, defaults=defaults, file=path)
    # 5. a cron that can be read but never fires (30 February)
    try:
        schedule.next_fire_times(1)
    except Exception as exc:  # croniter's CroniterBadDateError and kin
        raise bad(f"cron={cron!r} never fires ({exc})") from None
    return schedule


def check_source(schedule: Schedule, settings: Any = None) -> None:
    """Defaults, grid and manifest path checked as the next firing would use them (models against
    the deployment's `settings`)."""
    from models.errors import InvalidRequest
    from models.request import parse_request
    from producer.runs.manifest import SUFFIXES, ManifestError, fill_placeholders, format_rejects

    where = f"{schedule.file}: schedule {schedule.name!r}"
    if schedule.defaults:
        try:
            parse_request({"prompt": "defaults check", **schedule.defaults}, settings)
        except InvalidRequest as exc:
            raise ScheduleError(f"{where}: defaults: {'; '.join(exc.problems)}") from None
    slot = schedule.next_fire_times(1)[0]
    if schedule.manifest is not None:
        path = Path(fill_placeholders(schedule.manifest, slot, schedule.name, where=f"{where}: manifest"))
        if path.suffix.lower() not in SUFFIXES:
            raise ScheduleError(f"{where}: manifest={schedule.manifest!r}: unknown manifest format "
                                f"{path.suffix or '(no suffix)'!r}: the formats are {', '.join(SUFFIXES)}")
        return  # the file itself may be written later, before its firing
    grid = dict(schedule.grid or {})
    if isinstance(grid.get("prompts_file"), str) and "prompts" not in grid:
        del grid["prompts_file"]  # like a manifest, the prompts file may be written before its firing
        grid["prompts"] = ["a prompt"]
    try:
        manifest = schedule.manifest_for(slot, grid, settings)
    except (ManifestError, InvalidRequest) as exc:
        raise ScheduleError(f"{where}: grid: {str(exc).removeprefix(schedule.grid_source + ': ')}") from None
    if manifest.reject_count:
        shown = format_rejects(manifest.rejects, limit=3, total=manifest.reject_count).replace("\n", "; ")
        raise ScheduleError(f"{where}: grid: {manifest.reject_count} bad row(s): {shown}")


# -- firing ----------------------------------------------------------------------------------------
def fire(client: Client, schedule: Schedule, slot: datetime, *, resume: bool = False) -> EnqueueReport | None:
    """Make the slot's run; None when it exists already (another scheduler made it).

    Raises ScheduleError when the manifest has bad rows (nothing is enqueued), and whatever an
    outage raises. With `resume` a run that exists is finished rather than left: an earlier
    attempt of this slot may have made it before an outage stopped it.
    """
    from producer.runs.enqueue import enqueue_run
    from producer.runs.manifest import format_rejects

    # 1. a run that exists needs no manifest read (the other scheduler's firing, usually)
    name = schedule.run_name(slot)
    if not resume and run_exists(client.db, name):
        return None
    # 2. the manifest; a bad row refuses the whole firing
    manifest = schedule.manifest_for(slot, settings=client.settings)
    if manifest.reject_count:
        raise ScheduleError(f"schedule {schedule.name!r}: firing {schedule.local(slot).isoformat()} refused, "
                            f"{manifest.reject_count} bad row(s) in {manifest.source}:\n"
                            + format_rejects(manifest.rejects, total=manifest.reject_count))
    # 3. the run: one winner among the schedulers
    return enqueue_run(client, name, manifest, defaults=schedule.defaults, priority=schedule.priority,
                       schedule=schedule.name, fire_time=schedule.local(slot), only_if_new=not resume,
                       append=resume, progress=False)


def run_exists(db: Database, name: str) -> bool:
    from sqlalchemy import select

    from models.tables import Run

    with db.session() as session:
        return session.scalar(select(Run.id).where(Run.name == name)) is not None


def last_fire_times(db: Database, names: list[str]) -> dict[str, datetime]:
    """Each schedule's latest fire time in the database (schedules that never fired are absent)."""
    from sqlalchemy import func, select

    from models.jobs import aware
    from models.tables import Run

    with db.session() as session:
        rows = session.execute(select(Run.schedule, func.max(Run.fire_time))
                               .where(Run.schedule.in_(names), Run.fire_time.is_not(None))
                               .group_by(Run.schedule)).all()
    return {name: aware(when) for name, when in rows if when is not None}  # type: ignore[misc]


def abandoned_firings(db: Database, names: list[str], made_before: datetime) -> dict[str, list[datetime]]:
    """Fire times of runs a scheduler made but never sealed (killed mid-enqueue), made before
    `made_before`: old enough that no live scheduler is still writing them."""
    from sqlalchemy import select

    from models.jobs import aware
    from models.tables import Run

    with db.session() as session:
        rows = session.execute(select(Run.schedule, Run.fire_time)
                               .where(Run.schedule.in_(names), Run.fire_time.is_not(None), Run.sealed_at.is_(None),
                                      Run.created_at < made_before)
                               .order_by(Run.fire_time)).all()
    found: dict[str, list[datetime]] = {}
    for name, when in rows:
        found.setdefault(name, []).append(aware(when))
    return found


def is_outage(exc: BaseException) -> bool:
    """An error a later try may not meet: the database, broker or storage away for a while."""
    import socket

    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import RedisError
    from sqlalchemy.exc import InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from models.errors import ServiceUnavailable

    # Not any OSError: a manifest file that is missing is the firing's fault, not an outage.
    network = (ConnectionError, TimeoutError, socket.gaierror)
    database = (OperationalError, InterfaceError, PoolTimeout)
    return isinstance(exc, (ServiceUnavailable, *database, BrokerError, RedisError, *network))


@dataclass
class Pending:
    slot: datetime
    resume: bool = False  # the run may exist half-made: finish it


class Firings:
    """One schedule's firings still to make, oldest first: at start the abandoned ones and those
    catch_up picked from the missed slots, then every slot as it comes due (a tick that comes late
    still fires its slot). A firing met by an outage stays first and is tried again."""

    def __init__(self, schedule: Schedule, *, last: datetime | None, now: datetime,
                 abandoned: Sequence[datetime] = ()):
        self.schedule = schedule
        self.pending: deque[Pending] = deque(Pending(slot, resume=True) for slot in abandoned)
        self.pending.extend(Pending(slot) for slot in schedule.missed(last, now))
        self.cursor = now  # slots up to here are in `pending` or were decided at start
        self.retry_at: datetime | None = None
        self._next_slot: datetime | None = None

    def due(self, now: datetime) -> Pending | None:
        """The firing to make now, if any."""
        if now > self.cursor:
            # bounded like catch-up: a process stopped (SIGSTOP, a suspended host) for a week
            came = self.schedule.slots_between(self.cursor, now, MAX_CATCH_UP)
            if len(came) == MAX_CATCH_UP:
                logger.warning("schedule %s: %d or more slots came due at once since %s: the last %d fire",
                               self.schedule.name, MAX_CATCH_UP, self.schedule.local(self.cursor).isoformat(),
                               MAX_CATCH_UP)
            self.pending.extend(Pending(slot) for slot in came)
            self.cursor = now
            self._next_slot = None
        if self.pending and (self.retry_at is None or now >= self.retry_at):
            return self.pending[0]
        return None

    def seconds_until_due(self, now: datetime) -> float:
        if self.pending:
            return max((self.retry_at - now).total_seconds(), 0.0) if self.retry_at else 0.0
        if self._next_slot is None:
            self._next_slot = next(self.schedule.slots_after(self.cursor))
        return max((self._next_slot - now).total_seconds(), 0.0)

    def fire_due(self, client: Client, now: datetime) -> None:
        """Make the due firing; log what became of it. Never raises for a firing's own failure."""
        pending = self.due(now)
        if pending is None:
            return
        schedule, slot = self.schedule, pending.slot
        run = schedule.run_name(slot)
        try:
            report = fire(client, schedule, slot, resume=pending.resume)
        except ScheduleError as exc:
            logger.error("%s", exc)
        except Exception as exc:
            if is_outage(exc):
                self.retry_at = now + timedelta(seconds=RETRY_SECONDS)
                pending.resume = True  # the run may have been made before the outage struck
                logger.error("run %s: firing failed (%s: %s); trying again in %g s", run, type(exc).__name__,
                             str(exc).strip().splitlines()[0] if str(exc).strip() else "", RETRY_SECONDS)
                return
            if isinstance(exc, SdqueueError):  # a manifest that cannot be read, a bad request field
                logger.error("run %s: firing refused: %s", run, exc)
            else:
                logger.exception("run %s: firing failed", run)
        else:
            if report is None:
                logger.info("run %s: made by another scheduler", run)
            else:
                logger.info("%s", report)
        self.pending.popleft()
        self.retry_at = None


# -- Celery beat -----------------------------------------------------------------------------------
@cache
def beat_scheduler_class() -> type:
    """A celery.beat.Scheduler whose entries are the schedules, made on first use (this module is
    imported by commands that need no Celery).

    Its schedule objects say when a firing is due; its apply_entry makes the firing in this
    process (no task message). It keeps no file: the database is the state.
    """
    from celery.beat import Scheduler
    from celery.schedules import BaseSchedule, schedstate

    class FiringSchedule(BaseSchedule):  # type: ignore[misc]
        """An entry's schedule: due while its schedule has a firing to make."""

        def __init__(self, firings: Firings, nowfun: Any = utcnow):
            super().__init__(nowfun=nowfun)
            self.firings = firings

        def remaining_estimate(self, last_run_at: datetime) -> timedelta:
            return timedelta(seconds=self.firings.seconds_until_due(self.now()))

        def is_due(self, last_run_at: datetime) -> tuple[bool, float]:
            now = self.now()
            if self.firings.due(now) is not None:
                return schedstate(True, 0.0)  # look again at once: more may be pending
            return schedstate(False, self.firings.seconds_until_due(now))

        def __eq__(self, other: object) -> bool:
            return self is other

        def __hash__(self) -> int:
            return id(self)

        def __repr__(self) -> str:
            schedule = self.firings.schedule
            return f"<cron {schedule.cron!r} in {schedule.timezone}>"

    class ScheduleScheduler(Scheduler):  # type: ignore[misc]
        """Beat's scheduler for a schedules file: state from the database, firings in process."""

        def __init__(self, app: Any, *, schedules: list[Schedule], client: Client, nowfun: Any = utcnow,
                     **kwargs: Any):
            self.schedules, self.client, self.nowfun = schedules, client, nowfun
            self.firing = False  # a firing is being made: a stop waits for it
            self.stop_requested = False
            kwargs.pop("schedule_filename", None)  # nothing is kept in a file
            kwargs.setdefault("max_interval", MAX_INTERVAL)
            super().__init__(app, **kwargs)

        def setup_schedule(self) -> None:
            now = self.nowfun()
            names = [schedule.name for schedule in self.schedules]
            last = last_fire_times(self.client.db, names)
            # by the clock runs are made with, whatever clock the slots are read from
            made_before = utcnow() - timedelta(seconds=self.client.settings.requeue_after)
            abandoned = abandoned_firings(self.client.db, names, made_before)
            for schedule in self.schedules:
                firings = Firings(schedule, last=last.get(schedule.name), now=now,
                                  abandoned=abandoned.get(schedule.name, []))
                catch_up = len(firings.pending)
                logger.info("schedule %s: cron %r in %s, last fired %s, %d firing(s) to catch up, next %s",
                            schedule.name, schedule.cron, schedule.timezone,
                            schedule.local(last[schedule.name]).isoformat() if schedule.name in last else "never",
                            catch_up, schedule.next_fire_times(1, now)[0].isoformat())
                self.schedule[schedule.name] = self.Entry(
                    name=schedule.name, task=f"sdqueue.schedule:{schedule.name}",
                    schedule=FiringSchedule(firings, self.nowfun), app=self.app)

        def apply_entry(self, entry: Any, producer: Any = None) -> None:
            self.firing = True
            try:
                entry.schedule.firings.fire_due(self.client, self.nowfun())
            finally:
                self.firing = False
            if self.stop_requested:
                raise SystemExit(0)

        def request_stop(self) -> None:
            """From a signal handler: stop now, or once the firing being made is made."""
            if self.firing and not self.stop_requested:
                self.stop_requested = True
                logger.info("stopping once the firing in progress is made (signal again to stop at once)")
                return
            raise SystemExit(0)

        @property
        def info(self) -> str:
            return f"    . schedules -> {', '.join(s.name for s in self.schedules)}"

    return ScheduleScheduler


def run_beat(path: Path | str, *, loglevel: str = "INFO") -> int:
    """`sdqueue beat`: fire the file's schedules until SIGTERM or SIGINT."""
    import signal
    from functools import partial

    from celery.beat import Service

    from models.errors import ConfigError, ServiceUnavailable
    from models.logs import configure_logging, level_number
    from models.settings import load_settings
    from producer.client import Client, make_sender

    # 1. the file and the settings, refused before anything runs
    settings = load_settings()
    schedules = load_schedules(path, settings=settings)
    if settings.in_process_broker:
        raise ConfigError("sdqueue beat enqueues through a broker workers share: "
                          "set SDQUEUE_BROKER_URL=redis://HOST:6379/0")
    configure_logging(settings, loglevel, text_format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    for chatty in ("alembic", "botocore"):  # the schema check and the credentials search, at every start
        logging.getLogger(chatty).setLevel(max(logging.WARNING, level_number(loglevel)))
    # 2. the database (its runs are the state) and a sender
    client = Client(settings)
    app = make_sender(settings)
    app.conf.beat_schedule_filename = str(settings.data_dir / "celerybeat-schedule")  # never opened: no file
    scheduler_cls = partial(beat_scheduler_class(), schedules=schedules, client=client)
    service = Service(app, max_interval=MAX_INTERVAL, scheduler_cls=scheduler_cls, remote_control=False)
    # 3. signals stop it between firings, never in the middle of one (a second one does)
    try:
        try:
            scheduler = service.scheduler  # reads the database: catch-up is decided here
        except Exception as exc:
            if not is_outage(exc):
                raise
            raise ServiceUnavailable(f"the database cannot be read at start ({type(exc).__name__}: "
                                     f"{str(exc).strip().splitlines()[0]})") from None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: scheduler.request_stop())
        logger.info("beat: %d schedule(s) from %s", len(schedules), path)
        service.start()
    finally:
        client.close()
    logger.info("beat: stopped")
    return 0


def describe(schedules: list[Schedule], count: int, now: datetime | None = None) -> str:
    """`sdqueue schedules list`: each schedule and its next `count` fire times."""
    lines = []
    for schedule in schedules:
        lines.append(f"{schedule.name}")
        lines.append(f"  cron      {schedule.cron}  ({schedule.timezone})")
        lines.append(f"  enqueues  {schedule.what}")
        if schedule.defaults:
            lines.append(f"  defaults  {json.dumps(schedule.defaults, sort_keys=True, default=str)}")
        lines.append(f"  priority  {schedule.priority}   catch_up {schedule.catch_up}")
        for i, slot in enumerate(schedule.next_fire_times(count, now)):
            lines.append(f"  {'next' if i == 0 else '':8}  {slot.isoformat()}")
    return "\n".join(inert(line) for line in lines)  # names and prompts are users' words
