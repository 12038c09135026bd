"""SDQUEUE_LOG_FORMAT: text lines as before, or one JSON object a line naming the job, run and batch."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Iterator

import pytest
from sqlalchemy import select

from models.errors import ConfigError
from models.logs import about, configure_logging, job_context
from models.settings import load_settings
from models.tables import Job, Run
from producer.cli import main
from producer.runs.enqueue import enqueue_run
from producer.runs.manifest import load_manifest
from tests.conftest import small, wait_for
from tests.servers import free_port, stop_process_group

TIMEOUT = 240


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as JSON (a line that is not fails the test, and says which)."""
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return entries


@pytest.fixture
def captured() -> Iterator[Any]:
    """configure_logging into a string, for the test; the root logger as it was afterwards."""
    root = logging.getLogger()
    level = root.level
    handlers: list[logging.Handler] = []

    def configure(settings: Any, level: str = "INFO", **kwargs: Any) -> io.StringIO:
        stream = io.StringIO()
        handler = configure_logging(settings, level, stream=stream, **kwargs)
        assert handler is not None
        handlers.append(handler)
        return stream

    yield configure
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)  # json mode sends warnings to the log


def test_json_lines_name_the_job_run_and_batch(settings, client, worker, captured, tmp_path):
    # after `worker`: Celery's test worker sets the root logger's level to ERROR when it starts
    stream = captured(settings.model_copy(update={"log_format": "json"}))
    # 1. a job of a run, and a job of none, through the real worker
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps(small(prompt="a lighthouse", seed=3)) + "\n")
    name = f"logged-{settings.queue}"
    enqueue_run(client, name, load_manifest(manifest), progress=False)
    with client.db.session() as session:
        run_job_id, run_id = session.execute(
            select(Job.id, Job.run_id).join(Run, Run.id == Job.run_id).where(Run.name == name)).one()
    alone = client.submit(small(prompt="a boat", seed=4))
    for job_id in (run_job_id, alone):
        assert client.wait(job_id, timeout=TIMEOUT)["state"] == "succeeded"
    # 2. every line is JSON, with its fields; the line that records each job names it, its run and batch
    def logged() -> list[dict[str, Any]]:
        entries = parse_lines(stream.getvalue())
        done = {e.get("job_id") for e in entries if "recorded" in e["message"]}
        return entries if {run_job_id, alone} <= done else []  # logged just after the row is written

    entries = wait_for(logged, timeout=30)
    assert entries and all({"time", "level", "logger", "message", "process", "thread"} <= set(e) for e in entries)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)
    for job_id, run in ((run_job_id, run_id), (alone, None)):
        record = client.get(job_id)
        recorded = [e for e in entries if e.get("job_id") == job_id and "recorded" in e["message"]]
        assert len(recorded) == 1, entries
        assert recorded[0]["level"] == "INFO" and recorded[0]["logger"] == "worker.engine"
        assert recorded[0].get("run") == run
        assert recorded[0].get("run_name") == (name if run else None)  # the run by its name too
        assert (f"(run {name})" in recorded[0]["message"]) == bool(run)
        assert recorded[0]["batch_id"] == record["images"][0]["batch_id"]
    # (Celery's own lines are checked in a worker process: this test worker decided at its start,
    # at level ERROR, not to log a task's receipt and end.)


def test_json_fields_from_a_context_and_an_exception(settings, captured):
    stream = captured(settings.model_copy(update={"log_format": "json"}))
    log = logging.getLogger("sdqueue.test")
    with job_context(job_id="J1", run="R1"):
        log.info("claimed\nsecond line")
        log.info("in a batch", extra=about(batch_id="B1"))
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed", extra=about("J2"))  # given at the call: wins over the context
    log.warning("outside")
    first, batched, failed, outside = parse_lines(stream.getvalue())
    assert first["message"] == "claimed\nsecond line" and (first["job_id"], first["run"]) == ("J1", "R1")
    assert "batch_id" not in first and batched["batch_id"] == "B1" and batched["job_id"] == "J1"
    assert failed["job_id"] == "J2" and failed["level"] == "ERROR"
    assert failed["exc"].startswith("Traceback") and "RuntimeError: boom" in failed["exc"]
    assert outside["level"] == "WARNING" and not {"job_id", "run", "batch_id", "exc"} & set(outside)
    assert (first["process"], first["thread"]) == ("MainProcess", "MainThread")


def test_text_lines_are_unchanged(settings, captured):
    assert settings.log_format == "text"  # the default
    stream = captured(settings)
    with job_context(job_id="J1"):
        logging.getLogger("worker").info("job %s: claimed", "J1", extra=about("J1", "R1", "B1"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO worker: job J1: claimed\n", stream.getvalue())
    stream = captured(settings, "WARNING", text_format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    logging.getLogger("sdqueue.schedules").info("not shown")
    logging.getLogger("sdqueue.schedules").warning("shown")
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d [\d:,]+: WARNING/sdqueue.schedules\] shown\n", stream.getvalue())


def test_a_bad_format_or_level_is_refused(settings_env, monkeypatch, capsys):
    monkeypatch.setenv("SDQUEUE_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match=r"SDQUEUE_LOG_FORMAT='xml': Input should be 'text' or 'json'"):
        load_settings()
    assert main(["sweep"]) == 1
    assert capsys.readouterr().err == ("sdqueue: error: bad setting: SDQUEUE_LOG_FORMAT='xml': "
                                       "Input should be 'text' or 'json'\n")
    monkeypatch.setenv("SDQUEUE_LOG_FORMAT", "json")
    with pytest.raises(ConfigError, match=r"--loglevel='LOUD': must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        configure_logging(load_settings(), "LOUD", stream=io.StringIO())


def test_print_and_stderr_writes_become_json_lines(settings, captured):
    from models.logs import LineLogger, redirect_std_streams

    stream = captured(settings.model_copy(update={"log_format": "json"}))
    saved = sys.stdout, sys.stderr
    try:
        redirect_std_streams()
        print("a banner", "in two", "parts")
        sys.stderr.write("a library's own line\nand half ")
        sys.stderr.write("a line\n")
        assert isinstance(sys.stdout, LineLogger) and sys.stdout.real is saved[0]
    finally:
        sys.stdout, sys.stderr = saved
    lines = [(e["logger"], e["level"], e["message"]) for e in parse_lines(stream.getvalue())]
    assert lines == [("stdout", "INFO", "a banner in two parts"), ("stderr", "WARNING", "a library's own line"),
                     ("stderr", "WARNING", "and half a line")]


def test_worker_process_logs_json_lines(settings_env, client, tmp_path):
    # `sdqueue worker` as an operator runs it: Celery's lines and ours, each a JSON object on stderr
    # and stdout, from the first (torch's threads) to the last (Celery's shutdown notice)
    # SDQUEUE_TORCH_THREADS=0: the automatic choice, logged as such (the tests otherwise pin 1)
    env = {**os.environ, "SDQUEUE_LOG_FORMAT": "json", "SDQUEUE_METRICS_PORT": "0", "SDQUEUE_TORCH_THREADS": "0"}
    stderr = tmp_path / "worker.err"
    with open(stderr, "wb") as err, open(tmp_path / "worker.out", "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker"], stdout=out, stderr=err,
                                  env=env, start_new_session=True)
    try:
        job_id = client.submit(small(prompt="a small boat", seed=5))
        assert client.wait(job_id, timeout=TIMEOUT)["state"] == "succeeded", stderr.read_text()[-3000:]
        wait_for(lambda: f'"job_id": "{job_id}"' in stderr.read_text(), timeout=30)
    finally:
        stop_process_group(worker, timeout=60)  # SIGTERM: Celery's warm shutdown, logged too
    entries = parse_lines(stderr.read_text())
    loggers = {e["logger"] for e in entries}
    assert "worker" in loggers and any(name.startswith("celery.") for name in loggers), loggers
    assert any(e.get("job_id") == job_id and "recorded" in e["message"] for e in entries)
    celery = [e for e in entries if e["logger"].startswith("celery.") and job_id in e["message"]]
    assert {"received", "succeeded"} <= {word for e in celery for word in e["message"].split()}, celery
    assert all(e.get("job_id") == job_id for e in celery)  # the task id is the job id
    assert any("ready" in e["message"] for e in entries if e["logger"].startswith("celery."))
    assert "RANDOM weights" in stderr.read_text()  # the tiny model's warning, as JSON too
    assert "celery@" not in (tmp_path / "worker.out").read_text()  # no banner
    assert not parse_lines((tmp_path / "worker.out").read_text())  # JSON lines, if any: none are written there
    cores = len(os.sched_getaffinity(0))
    assert f"torch threads: {cores} ({cores} usable cores / 1 worker(s) on this host" in entries[0]["message"]
    assert any(e["message"] == "worker: Warm shutdown (MainProcess)" for e in entries)  # Celery's, on stdout before
    # the Celery node name is the worker process's own: host and pid
    assert any(e["message"] == f"sdqueue-{settings_env['SDQUEUE_QUEUE']}-{worker.pid}@{socket.gethostname()} ready."
               for e in entries)


def test_api_process_logs_json_lines(settings_env, tmp_path):
    # uvicorn's own lines (start-up, each request) through the same JSON handler
    port = free_port()
    env = {**os.environ, "SDQUEUE_LOG_FORMAT": "json", "SDQUEUE_API_AUTH": "off"}
    stderr = tmp_path / "api.err"
    with open(stderr, "wb") as err:
        api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                time.sleep(0.2)
                return False

        wait_for(healthy, timeout=60)
        wait_for(lambda: "/healthz" in stderr.read_text(), timeout=10)
    finally:
        stop_process_group(api, timeout=30)
    entries = parse_lines(stderr.read_text())
    assert any(e["logger"] == "sdqueue.api" and "SDQUEUE_API_AUTH=off" in e["message"] for e in entries)
    assert any(e["logger"] == "uvicorn.error" for e in entries)
    assert any(e["logger"] == "uvicorn.access" and "GET /healthz" in e["message"] for e in entries)

