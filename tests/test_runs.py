"""Runs: a manifest enqueued in bulk, idempotent and resumable, then listed, cancelled, retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from models.constants import queue_for
from models.errors import RunExists
from models.tables import Job, JobState, Run
from producer.cli import main
from producer.runs.enqueue import enqueue_run
from producer.runs.manifest import load_manifest
from tests.conftest import interactive_queue, small, wait_for, waiting_job_ids


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_jobs(client, name: str) -> list[Job]:  # type: ignore[no-untyped-def]
    with client.db.session() as session:
        return list(session.scalars(select(Job).join(Run, Run.id == Job.run_id).where(Run.name == name)))


def messages(settings, queue: str) -> Counter:  # type: ignore[no-untyped-def]
    return waiting_job_ids(settings.broker_url, queue)


def sent_through(client, name: str):  # type: ignore[no-untyped-def]
    """When the newest batch of the run's rows that was sent was created (None: none was)."""
    with client.db.session() as session:
        return session.scalars(select(Run.sent_through).where(Run.name == name)).one()


def test_a_manifest_run_twice_enqueues_each_job_once(client, settings, tmp_path):
    rows = [{"prompt": f"a lighthouse number {i}", "seed": i} for i in range(300)] + [{"prompt": "the same"}] * 2
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    assert main(["run", str(manifest), "--name", "twice", "--width", "256", "--height", "256"]) == 0
    assert main(["run", str(manifest), "--name", "twice", "--width", "256", "--height", "256"]) == 0

    jobs = run_jobs(client, "twice")
    assert len(jobs) == 302 and len({job.run_key for job in jobs}) == 302
    assert all(job.priority == "bulk" and job.state == "queued" and job.enqueued_at is not None for job in jobs)
    assert {job.params["width"] for job in jobs} == {256}  # the options are the rows' defaults
    assert sorted(job.seed for job in jobs if job.params["prompt"] != "the same") == list(range(300))
    sent = messages(settings, queue_for(settings.queue, "bulk", settings.default_model))
    assert set(sent) == {job.id for job in jobs} and max(sent.values()) == 1
    assert messages(settings, interactive_queue(settings)) == Counter()  # nothing on the interactive queue

    # the file grows: it is another source now, refused; with --append only the new row is enqueued
    write_jsonl(manifest, rows + [{"prompt": "one more"}])
    grown = load_manifest(manifest, {"width": 256, "height": 256})
    with pytest.raises(RunExists, match=r"^run 'twice' exists and its source was .*m\.jsonl \(sha256 \w{12}\), "
                       r"this is .*m\.jsonl \(sha256 \w{12}\): give another --name, or --append"):
        enqueue_run(client, "twice", grown, defaults={"width": 256, "height": 256}, progress=False)
    assert len(run_jobs(client, "twice")) == 302
    report = enqueue_run(client, "twice", grown, defaults={"width": 256, "height": 256}, append=True, progress=False)
    assert report is not None and (report.inserted, report.existing, report.created) == (1, 302, False)
    assert len(run_jobs(client, "twice")) == 303


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_an_enqueue_stopped_halfway_resumes_with_every_row_once(client, settings, settings_env, tmp_path, stop):
    total = 30_000
    manifest = write_jsonl(tmp_path / "big.jsonl", [{"prompt": f"a fox number {i}", "seed": i} for i in range(total)])
    name = f"halfway-{stop.name}"
    command = [sys.executable, "-m", "producer.cli", "run", str(manifest), "--name", name]
    # SIGINT as a terminal's Ctrl-C delivers it, even where this test runs with it ignored (a
    # background job): Python then leaves it ignored in the child too.
    proc = subprocess.Popen(command, env={**os.environ, **settings_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def written() -> int:
        with client.db.session() as session:
            return session.scalar(select(func.count()).select_from(Job).join(Run).where(Run.name == name)) or 0

    wait_for(lambda: written() > 0 or proc.poll() is not None, timeout=120, step=0.005)
    # Python may swallow a KeyboardInterrupt that lands in a weakref callback ("Exception ignored"):
    # like a user, press Ctrl-C again until the command stops.
    while proc.poll() is None:
        proc.send_signal(stop)
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    out, err = proc.communicate(timeout=60)
    before = written()
    assert 0 < before < total, f"stopped too late ({before} of {total} written; exit {proc.returncode}: {out} {err})"

    done = subprocess.run(command, env={**os.environ, **settings_env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{total - before} job(s) enqueued" in done.stdout
    jobs = run_jobs(client, name)
    assert len(jobs) == total and sorted(job.seed for job in jobs) == list(range(total))
    through = sent_through(client, name)  # none left written but never sent
    assert through is not None and all(job.created_at <= through for job in jobs)
    sent = messages(settings, queue_for(settings.queue, "bulk", settings.default_model))
    assert set(sent) == {job.id for job in jobs}
    # A batch sent but not yet marked when it stopped is sent again: its second delivery finds
    # the job claimed or ended and is dropped (tests/test_leases.py); never more than one batch.
    assert sum(n - 1 for n in sent.values()) <= 1000


def test_rows_written_but_not_sent_are_sent_by_the_next_enqueue(client, settings, tmp_path, monkeypatch):
    manifest = load_manifest(write_jsonl(tmp_path / "m.jsonl", [{"prompt": f"a boat {i}"} for i in range(25)]))

    def broker_down(job_ids, queue=None):  # type: ignore[no-untyped-def]
        raise ConnectionError("broker down")

    monkeypatch.setattr(client, "send", broker_down)
    with pytest.raises(ConnectionError):
        enqueue_run(client, "unsent", manifest, progress=False, batch_size=10)
    monkeypatch.undo()
    assert len(run_jobs(client, "unsent")) == 10 and sent_through(client, "unsent") is None  # written, not sent

    report = enqueue_run(client, "unsent", manifest, progress=False, batch_size=10)
    assert report is not None and (report.inserted, report.sent) == (15, 25)
    assert set(messages(settings, queue_for(settings.queue, "bulk", settings.default_model))) == {job.id for job in run_jobs(client, "unsent")}


def test_a_manifest_with_bad_rows_is_refused_whole_or_skipped(client, settings, tmp_path, capsys):
    rows = [{"prompt": "fine"}, {"prompt": "too wide", "width": 500}, {"prompt": ""}, {"prompt": "fine too"}]
    manifest = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["run", str(manifest), "--name", "bad"]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 rows are invalid; nothing was enqueued" in err
    assert "line 2: width=500: must be a multiple of 64" in err and "line 3: prompt" in err
    with client.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Run).where(Run.name == "bad")) == 0

    assert main(["run", str(manifest), "--name", "bad", "--skip-invalid"]) == 0
    assert sorted(job.params["prompt"] for job in run_jobs(client, "bad")) == ["fine", "fine too"]
    rejects = [json.loads(line) for line in (tmp_path / "bad.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3]

    assert main(["run", str(manifest), "--name", "bad2", "--width", "500"]) == 2
    assert "width=500" in capsys.readouterr().err


def test_a_worker_drains_a_run_and_runs_shows_cancels_and_retries_it(client, settings, worker, tmp_path, capsys):
    nan = '("a cat", "a dog").blend(0, 0)'  # NaN conditioning: the job fails by itself
    rows = [small(prompt=f"a red fox {i}", seed=i) for i in range(4)] + [small(prompt=nan, use_compel=True, seed=9)]
    assert main(["run", str(write_jsonl(tmp_path / "m.jsonl", rows)), "--name", "drain"]) == 0
    capsys.readouterr()

    def ended() -> bool:
        return all(JobState(job.state).terminal for job in run_jobs(client, "drain"))

    wait_for(ended, timeout=180, step=0.2)
    assert main(["runs", "show", "drain", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["jobs"]["succeeded"] == 4 and shown["jobs"]["failed"] == 1 and shown["images_done"] == 4
    assert shown["images_per_second"] > 0 and shown["eta_seconds"] == 0
    assert main(["runs", "show", "drain", "--watch"]) == 0  # ends at once: the run has ended
    assert "4 succeeded" in capsys.readouterr().out
    assert main(["runs"]) == 0
    assert any(line.startswith("drain ") for line in capsys.readouterr().out.splitlines())

    failed = next(job for job in run_jobs(client, "drain") if job.state == "failed")
    assert main(["runs", "retry", "drain"]) == 0
    assert "1 failed job(s) of run drain queued again" in capsys.readouterr().out
    wait_for(lambda: next(j for j in run_jobs(client, "drain") if j.id == failed.id).state == "failed"
             and next(j for j in run_jobs(client, "drain") if j.id == failed.id).attempts == failed.attempts + 1,
             timeout=120, step=0.2)
    again = next(job for job in run_jobs(client, "drain") if job.id == failed.id)
    assert again.seed == failed.seed == 9


def test_runs_cancel_cancels_the_queued_jobs(client, tmp_path, capsys):
    enqueue_run(client, "to-cancel", load_manifest(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "x"}] * 3)),
                progress=False)
    assert main(["runs", "cancel", "to-cancel"]) == 0
    assert "3 queued job(s) of run to-cancel cancelled" in capsys.readouterr().out
    assert {job.state for job in run_jobs(client, "to-cancel")} == {"cancelled"}
    assert main(["runs", "show", "no-such-run"]) == 3
