"""Schedules: the file and its refusals, fire times across DST, catch-up against the runs in the
database, firings refused or met by an outage, and `sdqueue beat` firing each slot exactly once
with two beats running and across a restart."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlalchemy import func, select

from models.constants import queue_for
from models.errors import SdqueueError
from models.tables import Job, Run
from producer.cli import main
from producer.runs import schedules as sched
from producer.runs.schedules import Firings, Schedule, ScheduleError, load_schedules
from tests.conftest import waiting_job_ids

ROOT = Path(__file__).resolve().parent.parent
BERLIN = ZoneInfo("Europe/Berlin")
UTC = timezone.utc
SMALL = "[schedule.defaults]\nwidth = 256\nheight = 256\nnum_inference_steps = 3\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Schedules enqueue only: no model to build (overrides conftest's data dir)."""
    return tmp_path_factory.mktemp("data")


def write(tmp_path: Path, text: str, name: str = "schedules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def schedule(cron: str, *, tz: str = "UTC", catch_up: str = "skip", name: str = "s") -> Schedule:
    return Schedule(name=name, cron=cron, timezone=tz, priority="bulk", catch_up=catch_up, manifest="m.jsonl",
                    grid=None, defaults={}, file=Path("/nowhere/schedules.toml"))


def iso(times: list[datetime]) -> list[str]:
    return [t.isoformat() for t in times]


# -- the file ------------------------------------------------------------------------------------
EXAMPLE = """
[[schedule]]
name = "nightly-cities"          # unique in the file
cron = "0 2 * * *"
timezone = "Europe/Berlin"
priority = "bulk"
catch_up = "latest"
manifest = "prompts/{date}.jsonl"
[schedule.defaults]
num_inference_steps = 30

[[schedule]]
name = "every.2s_grid"
cron = "* * * * * */2"
[schedule.grid]
prompts = ["a city at night, {date}"]
seeds = { from_fire_time = true, count = 4 }
"""


def test_the_file_is_read_with_its_defaults(tmp_path):
    nightly, grid = load_schedules(write(tmp_path, EXAMPLE))
    assert (nightly.name, nightly.cron, nightly.timezone, nightly.priority, nightly.catch_up) == (
        "nightly-cities", "0 2 * * *", "Europe/Berlin", "bulk", "latest")
    assert nightly.manifest == "prompts/{date}.jsonl" and nightly.grid is None
    assert nightly.defaults == {"num_inference_steps": 30}
    assert nightly.run_name(datetime(2026, 11, 29, 1, 0, tzinfo=UTC)) == "nightly-cities@2026-11-29T02:00:00+01:00"
    # the defaults: UTC, bulk, skip
    assert (grid.timezone, grid.priority, grid.catch_up, grid.manifest) == ("UTC", "bulk", "skip", None)
    assert grid.grid == {"prompts": ["a city at night, {date}"], "seeds": {"from_fire_time": True, "count": 4}}
    # the grid as a firing builds it: placeholders filled, seeds from the fire time
    slot = datetime(2026, 5, 1, 12, 0, 2, tzinfo=UTC)
    manifest = grid.manifest_for(slot)
    assert not manifest.rejects
    assert [row.request.prompt for row in manifest.rows] == ["a city at night, 2026-05-01"] * 4
    assert [row.request.seed for row in manifest.rows] == list(range(int(slot.timestamp()), int(slot.timestamp()) + 4))


def test_a_prompts_file_may_be_written_after_the_start(tmp_path):
    path = write(tmp_path, f"""
[[schedule]]
name = "daily"
cron = "0 6 * * *"
[schedule.grid]
prompts_file = "prompts/{{date}}.txt"
seed = 1
{SMALL}""")
    [daily] = load_schedules(path)  # the file of the next firing does not exist yet: no refusal
    slot = datetime(2026, 5, 1, 6, tzinfo=UTC)
    with pytest.raises(SdqueueError, match="2026-05-01.txt: cannot be read"):
        daily.manifest_for(slot)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "2026-05-01.txt").write_text("a bakery at dawn\na market at dawn\n")
    assert [row.request.prompt for row in daily.manifest_for(slot).rows] == ["a bakery at dawn", "a market at dawn"]


def test_schedules_list_shows_each_schedule_and_its_next_fire_times(tmp_path, capsys):
    path = write(tmp_path, EXAMPLE)
    assert main(["schedules", "list", "--schedules", str(path), "--count", "4"]) == 0
    out = capsys.readouterr().out
    for text in ("nightly-cities", "0 2 * * *", "Europe/Berlin", "manifest prompts/{date}.jsonl", "catch_up latest",
                 "every.2s_grid", "* * * * * */2", "(UTC)", "grid ", "from_fire_time"):
        assert text in out
    nightly = out.split("every.2s_grid")[0]
    times = [line.split()[-1] for line in nightly.splitlines() if line.rstrip().endswith(("+01:00", "+02:00"))]
    assert len(times) == 4 and all(t[11:19] == "02:00:00" for t in times)
    parsed = [datetime.fromisoformat(t) for t in times]
    days = (timedelta(days=1), timedelta(hours=23), timedelta(hours=25))  # 23 and 25 across a DST change
    assert all(b - a in days for a, b in zip(parsed, parsed[1:]))


GOOD = 'name = "ok"\ncron = "0 2 * * *"\nmanifest = "m.jsonl"\n'
REFUSED = [
    ('name = "a"\ncron = "61 * * * *"\nmanifest = "m.jsonl"', "'a': cron='61 * * * *' is not a valid"),
    ('name = "a"\ncron = "* * * *"\nmanifest = "m.jsonl"', "'a': cron='* * * *': needs a cron expression of 5"),
    ('name = "a"\ncron = "* * * * * * 2030"\nmanifest = "m.jsonl"', "'a': cron='* * * * * * 2030': needs"),
    ('name = "a"\ncron = "@daily"\nmanifest = "m.jsonl"', "'a': cron='@daily': needs"),
    ('name = "a"\ncron = "0 0 30 2 *"\nmanifest = "m.jsonl"', "'a': cron='0 0 30 2 *'"),
    ('name = "a"\ncron = "0 2 * * *"\ntimezone = "Europe/Bärlin"\nmanifest = "m.jsonl"',
     "'a': timezone='Europe/Bärlin' is not an IANA time zone"),
    ('name = "a"\ncron = "0 2 * * *"\ntimezone = "../../etc/passwd"\nmanifest = "m.jsonl"', "is not an IANA time zone"),
    ('name = "a"\ncron = "0 2 * * *"\ncatch_up = "some"\nmanifest = "m.jsonl"',
     "'a': catch_up='some': must be one of skip, latest, all"),
    ('name = "a"\ncron = "0 2 * * *"\npriority = "urgent"\nmanifest = "m.jsonl"', "'a': priority='urgent'"),
    ('name = "a"\ncron = "0 2 * * *"', "'a': needs either manifest"),
    ('name = "a"\ncron = "0 2 * * *"\nmanifest = "m.jsonl"\ngrid = {prompts = ["x"]}', "'a': needs either manifest"),
    ('name = "a"\ncron = "0 2 * * *"\nmanifest = "m.jsonl"\ncatchup = "all"', "'a': unknown key(s) 'catchup'"),
    ('name = "a b"\ncron = "0 2 * * *"\nmanifest = "m.jsonl"', "schedule 'a b': name='a b'"),
    ('cron = "0 2 * * *"\nmanifest = "m.jsonl"', "schedule #2: name=None"),
    ('name = "a"\ncron = "0 2 * * *"\nmanifest = "m.txt"', "'a': manifest='m.txt': unknown manifest format"),
    ('name = "a"\ncron = "0 2 * * *"\ngrid = {prompts = ["x"], colour = "red"}', "'a': grid: unknown key 'colour'"),
    ('name = "a"\ncron = "0 2 * * *"\ngrid = {prompts = ["x"], width = 500}', "'a': grid: 1 bad row(s): line 1: width"),
    ('name = "a"\ncron = "0 2 * * *"\nmanifest = "m.jsonl"\ndefaults = {steps = 3}', "'a': defaults: "),
    ('name = "ok"\ncron = "0 3 * * *"\nmanifest = "other.jsonl"', "'ok': the name is used twice"),
]


@pytest.mark.parametrize(("table", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_a_bad_schedule_is_refused_with_one_line_naming_it(tmp_path, capsys, table, message):
    path = write(tmp_path, f"[[schedule]]\n{GOOD}\n[[schedule]]\n{table}\n")
    with pytest.raises(ScheduleError) as refused:
        load_schedules(path)
    assert message in str(refused.value) and str(path) in str(refused.value)
    for command in (["schedules", "list", "--schedules", str(path)], ["beat", "--schedules", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdqueue: error: ") and message in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_beat_needs_a_broker_workers_share(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDQUEUE_BROKER_URL", "memory://")
    monkeypatch.setenv("SDQUEUE_DATA_DIR", str(tmp_path))
    assert main(["beat", "--schedules", str(write(tmp_path, f"[[schedule]]\n{GOOD}"))]) == 1
    assert "set SDQUEUE_BROKER_URL=redis://" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())[1:]  # nothing but the schedules file


@pytest.mark.parametrize(("text", "message"), [
    ("[[schedule]\nname = 'x'", "is not valid TOML"),
    ("schedules = []", "unknown top-level key(s) 'schedules'"),
    ("", "no [[schedule]] tables"),
    ("schedule = 3", "must be an array of tables"),
])
def test_a_bad_file_is_refused(tmp_path, text, message):
    with pytest.raises(ScheduleError, match=re.escape(message)):
        load_schedules(write(tmp_path, text))
    with pytest.raises(ScheduleError, match="cannot be read"):
        load_schedules(tmp_path / "missing.toml")


# -- fire times ----------------------------------------------------------------------------------
def test_fire_times_across_the_spring_dst_change():
    """Europe/Berlin, 2026-03-29: 02:00 -> 03:00. A slot in the missing hour is shifted to 03:00,
    once; slots outside it keep their wall time, with the new offset."""
    before = datetime(2026, 3, 27, 12, tzinfo=BERLIN)
    assert iso(schedule("30 2 * * *", tz="Europe/Berlin").next_fire_times(4, before)) == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00"]
    assert iso(schedule("0 9 * * *", tz="Europe/Berlin").next_fire_times(3, before)) == [
        "2026-03-28T09:00:00+01:00", "2026-03-29T09:00:00+02:00", "2026-03-30T09:00:00+02:00"]
    night = datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN)
    assert iso(schedule("0 * * * *", tz="Europe/Berlin").next_fire_times(3, night)) == [
        "2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]
    # three slots of the missing hour land on 03:00: it fires once
    assert iso(schedule("*/20 * * * *", tz="Europe/Berlin").next_fire_times(4, night.replace(hour=1, minute=30))) == [
        "2026-03-29T01:40:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:20:00+02:00",
        "2026-03-29T03:40:00+02:00"]


def test_fire_times_across_the_autumn_dst_change():
    """Europe/Berlin, 2026-10-25: 03:00 -> 02:00. A wall time that exists twice fires once, at its
    first occurrence."""
    before = datetime(2026, 10, 23, 12, tzinfo=BERLIN)
    assert iso(schedule("30 2 * * *", tz="Europe/Berlin").next_fire_times(4, before)) == [
        "2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00"]
    night = datetime(2026, 10, 25, 0, 30, tzinfo=BERLIN)
    assert iso(schedule("0 * * * *", tz="Europe/Berlin").next_fire_times(4, night)) == [
        "2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00"]
    # from inside the repeated hour (02:10, second time): the next slot is past it
    inside = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)
    assert inside.astimezone(BERLIN).isoformat() == "2026-10-25T02:10:00+01:00"
    assert iso(schedule("*/20 * * * *", tz="Europe/Berlin").next_fire_times(2, inside)) == [
        "2026-10-25T03:00:00+01:00", "2026-10-25T03:20:00+01:00"]
    # each fire time names a different run
    slots = schedule("30 2 * * *", tz="Europe/Berlin").next_fire_times(60, before)
    assert len({schedule("30 2 * * *", tz="Europe/Berlin").run_name(s) for s in slots}) == 60


def test_seconds_cron_and_zones():
    start = datetime(2026, 1, 5, 12, 0, 0, 500000, tzinfo=UTC)
    assert iso(schedule("* * * * * */2").next_fire_times(3, start)) == [
        "2026-01-05T12:00:02+00:00", "2026-01-05T12:00:04+00:00", "2026-01-05T12:00:06+00:00"]
    assert iso(schedule("0 2 * * *", tz="America/New_York").next_fire_times(1, start)) == ["2026-01-06T02:00:00-05:00"]


# -- catch-up against a fake now -----------------------------------------------------------------
NOW = datetime(2026, 1, 10, 12, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(("catch_up", "expected"), [
    ("skip", []),
    ("latest", ["2026-01-10T12:00:00+00:00"]),
    ("all", ["2026-01-10T09:00:00+00:00", "2026-01-10T10:00:00+00:00", "2026-01-10T11:00:00+00:00",
             "2026-01-10T12:00:00+00:00"]),
])
def test_missed_slots_by_catch_up_policy(catch_up, expected):
    hourly = schedule("0 * * * *", catch_up=catch_up)
    last = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)
    assert iso(hourly.missed(last, NOW)) == expected
    assert hourly.missed(None, NOW) == []  # never fired: nothing missed
    assert hourly.missed(datetime(2026, 1, 10, 12, 0, tzinfo=UTC), NOW) == []  # up to date


def test_catch_up_all_is_bounded(caplog):
    caplog.set_level(logging.WARNING, logger="sdqueue.schedules")
    every_2s = schedule("* * * * * */2", catch_up="all")
    missed = every_2s.missed(NOW - timedelta(days=30), NOW)  # a million slots: never listed whole
    assert len(missed) == sched.MAX_CATCH_UP and missed[-1] == datetime(2026, 1, 10, 12, 0, 30, tzinfo=UTC)
    assert missed[0] == missed[-1] - timedelta(seconds=2 * (sched.MAX_CATCH_UP - 1))
    assert "only the last 1000 fire" in caplog.text


def test_firings_fire_every_slot_that_comes_due_even_late():
    hourly = schedule("0 * * * *", catch_up="latest")
    firings = Firings(hourly, last=datetime(2026, 1, 10, 8, 0, tzinfo=UTC), now=NOW)
    assert iso([p.slot for p in firings.pending]) == ["2026-01-10T12:00:00+00:00"]
    firings.pending.clear()
    assert firings.due(NOW + timedelta(minutes=10)) is None
    assert firings.seconds_until_due(NOW + timedelta(minutes=10)) == pytest.approx(49 * 60 + 30)
    # the tick comes 2 hours late: both slots fire, in order
    firings.due(NOW + timedelta(hours=2, minutes=5))
    assert iso([p.slot for p in firings.pending]) == ["2026-01-10T13:00:00+00:00", "2026-01-10T14:00:00+00:00"]


# -- with the database ---------------------------------------------------------------------------
class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def grid_file(tmp_path: Path, name: str, cron: str, catch_up: str, extra: str = "") -> Path:
    return write(tmp_path, f"""
[[schedule]]
name = "{name}"
cron = "{cron}"
catch_up = "{catch_up}"
{extra}
[schedule.grid]
prompts = ["a harbour at {{time}}", "a lighthouse at {{time}}"]
seed = 7
{SMALL}""", f"{name}.toml")


def make_scheduler(settings, client, path: Path, clock: Clock):  # type: ignore[no-untyped-def]
    from producer.client import make_sender

    cls = sched.beat_scheduler_class()
    return cls(make_sender(settings), schedules=load_schedules(path), client=client, nowfun=clock)


def tick_until_idle(scheduler) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if scheduler.tick() > 0:
            return
    raise AssertionError("beat never went idle")


def runs_of(client, name: str) -> list[Run]:  # type: ignore[no-untyped-def]
    with client.db.session() as session:
        return list(session.scalars(select(Run).where(Run.schedule == name).order_by(Run.fire_time)))


def jobs_by_run(client, name: str) -> dict[str, list[Job]]:  # type: ignore[no-untyped-def]
    with client.db.session() as session:
        rows = session.execute(select(Run.name, Job).join(Job, Job.run_id == Run.id).where(Run.schedule == name)).all()
    found: dict[str, list[Job]] = {}
    for run, job in rows:
        found.setdefault(run, []).append(job)
    return found


def fire_times(client, name: str) -> list[datetime]:  # type: ignore[no-untyped-def]
    return [run.fire_time.astimezone(UTC) for run in runs_of(client, name)]


def assert_sent_once(settings, jobs: list[Job]) -> None:  # type: ignore[no-untyped-def]
    """Every job marked sent, and no message twice in its queue. (Not "every message still
    there": another test session starting on the same Redis database flushes it.)"""
    assert jobs and all(job.enqueued_at is not None for job in jobs)
    sent = waiting_job_ids(settings.broker_url, queue_for(settings.queue, "bulk", settings.default_model))
    assert set(sent) <= {job.id for job in jobs} and all(n == 1 for n in sent.values())


@pytest.mark.parametrize(("catch_up", "fired"), [("skip", []), ("latest", [12]), ("all", [9, 10, 11, 12])])
def test_catch_up_from_the_runs_in_the_database(settings, client, tmp_path, catch_up, fired):
    name = f"catch-{catch_up}-{uuid.uuid4().hex[:6]}"
    path = grid_file(tmp_path, name, "0 * * * *", catch_up)
    at = lambda hour: datetime(2026, 1, 10, hour, 0, tzinfo=UTC)  # noqa: E731
    # an earlier scheduler fired 07:00 and 08:00, then none ran until 12:00:30
    for hour in (7, 8):
        assert sched.fire(client, load_schedules(path)[0], at(hour)) is not None
    clock = Clock(NOW)
    scheduler = make_scheduler(settings, client, path, clock)
    tick_until_idle(scheduler)
    assert fire_times(client, name) == [at(h) for h in (7, 8, *fired)]
    # then each slot as it comes due; a tick that comes late still fires its slot
    clock.now = at(13) + timedelta(seconds=1)
    tick_until_idle(scheduler)
    clock.now = at(15) + timedelta(minutes=20)
    tick_until_idle(scheduler)
    assert fire_times(client, name) == [at(h) for h in (7, 8, *fired, 13, 14, 15)]
    # every run: its 2 jobs, sealed, each sent once
    runs, jobs = runs_of(client, name), jobs_by_run(client, name)
    assert all(run.sealed_at is not None and run.expected_jobs == 2 and len(jobs[run.name]) == 2 for run in runs)
    assert runs[-1].name == f"{name}@2026-01-10T15:00:00+00:00"
    assert {job.params["prompt"] for job in jobs[runs[-1].name]} == {"a harbour at 15:00", "a lighthouse at 15:00"}
    assert_sent_once(settings, [job for js in jobs.values() for job in js])
    # a second scheduler over the same database (a restart) fires nothing again
    again = make_scheduler(settings, client, path, clock)
    tick_until_idle(again)
    assert len(runs_of(client, name)) == len(runs)


def test_a_firing_with_bad_rows_is_refused_and_the_next_one_fires(settings, client, tmp_path, caplog):
    name = f"bad-rows-{uuid.uuid4().hex[:6]}"
    path = write(tmp_path, f"""
[[schedule]]
name = "{name}"
cron = "0 * * * *"
manifest = "prompts/{{hour}}.jsonl"
{SMALL}""")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "13.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "too wide", "width": 500}\n')
    (tmp_path / "prompts" / "15.jsonl").write_text('{"prompt": "a quiet street"}\n')
    clock = Clock(datetime(2026, 1, 10, 12, 30, tzinfo=UTC))
    scheduler = make_scheduler(settings, client, path, clock)
    caplog.set_level(logging.INFO, logger="sdqueue.schedules")
    # 13:00 has a bad row: refused, nothing of it enqueued; 14:00 has no file; 15:00 fires
    clock.now = datetime(2026, 1, 10, 15, 0, 1, tzinfo=UTC)
    tick_until_idle(scheduler)
    assert [run.name for run in runs_of(client, name)] == [f"{name}@2026-01-10T15:00:00+00:00"]
    assert "firing 2026-01-10T13:00:00+00:00 refused, 1 bad row(s)" in caplog.text
    assert "line 2: width=500" in caplog.text
    assert "14.jsonl: cannot be read" in caplog.text


def test_a_firing_met_by_an_outage_is_tried_again(settings, client, tmp_path, monkeypatch, caplog):
    name = f"outage-{uuid.uuid4().hex[:6]}"
    path = grid_file(tmp_path, name, "0 * * * *", "skip")
    caplog.set_level(logging.INFO, logger="sdqueue.schedules")
    clock = Clock(datetime(2026, 1, 10, 12, 30, tzinfo=UTC))
    scheduler = make_scheduler(settings, client, path, clock)
    send, calls = client.send, []

    def broker_down_once(job_ids: list[str], queue: str | None = None) -> None:
        calls.append(job_ids)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        send(job_ids, queue)

    monkeypatch.setattr(client, "send", broker_down_once)
    clock.now = datetime(2026, 1, 10, 13, 0, 1, tzinfo=UTC)
    tick_until_idle(scheduler)
    assert "trying again in 5 s" in caplog.text
    [run] = runs_of(client, name)  # made before the broker failed: not sealed
    assert run.sealed_at is None
    clock.now += timedelta(seconds=sched.RETRY_SECONDS)
    tick_until_idle(scheduler)
    [run] = runs_of(client, name)
    jobs = jobs_by_run(client, name)[run.name]
    assert run.sealed_at is not None and len(jobs) == 2 and all(job.enqueued_at is not None for job in jobs)
    assert_sent_once(settings, jobs)


def test_a_run_left_half_made_is_finished_at_start(settings, client, tmp_path):
    """A scheduler killed between making a run and sealing it: the next one to start finishes it."""
    name = f"abandoned-{uuid.uuid4().hex[:6]}"
    path = grid_file(tmp_path, name, "0 * * * *", "skip")
    slot = datetime(2026, 1, 10, 11, 0, tzinfo=UTC)
    with client.db.session() as session:
        session.add(Run(id=str(uuid.uuid4()), name=f"{name}@{slot.isoformat()}", schedule=name, fire_time=slot,
                        priority="bulk", created_at=datetime.now(UTC) - timedelta(hours=1)))
    clock = Clock(datetime(2026, 1, 10, 12, 30, tzinfo=UTC))
    tick_until_idle(make_scheduler(settings, client, path, clock))
    [run] = runs_of(client, name)
    assert run.sealed_at is not None and len(jobs_by_run(client, name)[run.name]) == 2


# -- sdqueue beat, for real ----------------------------------------------------------------------
def start_beat(path: Path, cwd: Path, log: Path) -> subprocess.Popen:
    # A run made and not sealed a second before a start was left by a killed beat: finished then.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDQUEUE_REQUEUE_AFTER": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "producer.cli", "beat", "--schedules", str(path)], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def stop_beat(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


@pytest.fixture
def beats() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_runs(client, name: str, count: int, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while len(runs_of(client, name)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} runs of {name} after {timeout} s"
        time.sleep(0.2)


def test_two_beats_fire_each_slot_once_and_a_restart_neither_repeats_nor_skips(
        settings, client, tmp_path, beats: list[subprocess.Popen]):
    name = f"beat-{uuid.uuid4().hex[:6]}"
    path = write(tmp_path, f"""
[[schedule]]
name = "{name}"
cron = "* * * * * */2"
timezone = "Europe/Berlin"
catch_up = "all"
[schedule.grid]
prompts = ["a tram at {{time}}"]
seeds = {{ from_fire_time = true, count = 2 }}
{SMALL}""")
    log = tmp_path / "beat.log"
    # 1. two beats, racing for every slot
    beats += [start_beat(path, tmp_path, log), start_beat(path, tmp_path, log)]
    wait_for_runs(client, name, 1)
    time.sleep(6)
    # 2. one stops (SIGTERM: clean, between firings); the other goes on, then is killed (perhaps
    #    in the middle of a firing)
    assert stop_beat(beats[0]) == 0
    time.sleep(2.5)
    beats[1].kill()
    beats[1].wait()
    stopped = len(runs_of(client, name))
    assert stopped >= 3
    # 3. nothing runs for a while; a restart fires the slots missed meanwhile (catch_up = "all")
    time.sleep(4.5)
    restarted = datetime.now(UTC)
    beats.append(start_beat(path, tmp_path, log))
    wait_for_runs(client, name, stopped + 4)
    assert stop_beat(beats[2]) == 0

    text = log.read_text()
    assert "Traceback" not in text and text.count("beat: stopped") == 2, text
    assert not list(tmp_path.glob("celerybeat-schedule*"))  # the database is the state: no shelve file
    runs = runs_of(client, name)
    times = [run.fire_time.astimezone(UTC) for run in runs]
    assert len(runs) >= stopped + 4
    # consecutive 2 s slots: no gap, no slot twice
    assert all(b - a == timedelta(seconds=2) for a, b in zip(times, times[1:])), times
    assert all(run.name == f"{name}@{run.fire_time.astimezone(BERLIN).isoformat()}" for run in runs)
    # some were fired late, at the restart, for slots passed while nothing ran
    assert any(run.fire_time < restarted - timedelta(seconds=2) and run.created_at > restarted for run in runs)
    # each run: its 2 jobs once, sealed, with seeds from its fire time, each message sent once
    jobs = jobs_by_run(client, name)
    for run in runs:
        assert run.sealed_at is not None and run.expected_jobs == 2
        seed = int(run.fire_time.timestamp())
        assert sorted(job.seed for job in jobs[run.name]) == [seed, seed + 1]
    assert_sent_once(settings, [job for js in jobs.values() for job in js])
    with client.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Run).where(Run.schedule == name)) == len(runs)
