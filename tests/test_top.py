"""`sdqueue top` and the live worker registry it reads (models/workers.py, worker/status.py)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any, Iterator

import pytest

from models.workers import list_workers, publish_status, registry_key
from tests.conftest import gated_unet, small, wait_for

TIMEOUT = 180
# A gated job stops after this many UNet calls, until the test lets it go on.
GATE_AFTER = 3


@pytest.fixture
def settings(settings_env, monkeypatch):  # type: ignore[no-untyped-def]
    """The test set-up with workers publishing their status often (the CLI's subprocesses too)."""
    from models.settings import load_settings

    monkeypatch.setenv("SDQUEUE_STATUS_INTERVAL", "0.2")
    return load_settings()


@pytest.fixture
def clean_queues(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """This test's queues leave no message behind in the shared Redis database."""
    yield
    from models.broker import redis_client
    from models.constants import worker_queues

    redis = redis_client(settings)
    redis.delete(*worker_queues(settings.queue, settings.model), *worker_queues(settings.queue, "sd21-base"))
    redis.close()


def sdqueue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT)


def read_tty(master: int, until: Any, timeout: float = 60) -> str:
    """What the program on the pseudo-terminal wrote, read until `until(text)` or it closes."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not until(seen.decode(errors="replace")):
        assert time.monotonic() < deadline, f"timed out; the terminal showed:\n{seen.decode(errors='replace')}"
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_top_shows_the_worker_what_it_runs_and_the_queues(settings, client, worker):
    from producer.top import ENTER, HOME, LEAVE
    from worker.tasks import generate, reset_context

    engine = generate.context.engine
    with gated_unet(GATE_AFTER) as (gate, _):
        job_id = client.submit(small(prompt="a lighthouse", num_inference_steps=60))

        # (a) the registry shows the worker, its job at step 3 of 60, and the loop it is in
        def at_the_gate() -> dict[str, Any] | None:
            found = [w for w in list_workers(settings) if w["name"] == engine.hostname]
            running = found[0]["running"] if found else []
            return found[0] if running and running[0]["step"] == GATE_AFTER else None

        status = wait_for(at_the_gate, timeout=TIMEOUT)
        assert [w["name"] for w in list_workers(settings)] == [engine.hostname]  # this test's queue only
        assert status["running"] == [
            {"job_id": job_id, "size": "256x256", "images": 1, "step": GATE_AFTER, "steps": 60, "loop": 0}]
        assert status["loops"] == [{"size": "256x256", "jobs": 1, "samples": 1}]
        assert (status["held"], status["waiting"], status["draining"]) == (1, 0, False)
        assert (status["model"], status["device"], status["dtype"], status["batching"]) == (
            "tiny", "cpu", "float32", "continuous")
        assert status["queue"] == settings.queue and status["pid"] == os.getpid()
        assert status["updated_at"] >= status["started_at"] and status["images_done"] == 0

        # (b) one frame, as a pipe gets it: the worker, its job, the queues, the jobs by state
        once = sdqueue("top", "--once")
        assert once.returncode == 0, once.stderr
        frame = once.stdout
        assert "\x1b" not in frame  # plain text when not on a terminal
        assert "WORKERS 1" in frame and engine.hostname in frame
        assert "tiny on cpu float32 (continuous)  held 1  waiting 0  done 0" in frame
        assert "loop 256x256: 1 job(s), 1 sample(s)" in frame
        assert re.search(rf"{job_id}  x1  \[[#.]{{10}}\] step {GATE_AFTER}/60", frame), frame
        assert re.search(rf"^  {re.escape(settings.queue)}\.tiny +\d+$", frame, re.M), frame
        assert re.search(rf"^  {re.escape(settings.queue)}\.tiny\.bulk +\d+$", frame, re.M), frame
        assert re.search(r"^JOBS .*running [1-9]", frame, re.M), frame
        assert "RUNS IN PROGRESS" in frame

        # (c) live on a terminal (a pseudo-terminal of 40x120): drawn on the alternate screen,
        # redrawn in place, and the terminal given back as it was on Ctrl-C
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        live = subprocess.Popen([sys.executable, "-m", "producer.cli", "top", "--interval", "0.2"],
                                stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        try:
            shown = read_tty(master, lambda text: text.count(HOME) >= 3 and job_id in text.split(HOME)[-2])
            live.send_signal(signal.SIGINT)
            assert live.wait(TIMEOUT) == 0
            shown += read_tty(master, lambda text: False, timeout=TIMEOUT)  # to the end
        finally:
            if live.poll() is None:
                live.kill()
            os.close(master)
        assert shown.startswith(ENTER) and shown.rstrip("\r\n").endswith(LEAVE)
        frames = shown.split(HOME)[1:]
        assert len(frames) >= 3
        last = frames[-2]  # a whole frame (the last one ends with the terminal's restore)
        lines = [line.rstrip("\r") for line in last.replace("\x1b[K", "").split("\n")]
        assert all(len(line) <= 120 for line in lines)
        assert engine.hostname in last and f"step {GATE_AFTER}/60" in last and "WORKERS 1" in last
        gate.set()

    record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded", record["error"]
    # the image counted, and the rate with it
    done = wait_for(lambda: [w for w in list_workers(settings) if w["images_done"] == 1 and not w["held"]],
                    timeout=TIMEOUT)[0]
    assert done["running"] == [] and done["loops"] == [] and done["images_per_s"] > 0

    # (d) a worker that stops cleanly leaves the registry at once
    reset_context()
    assert list_workers(settings) == []


def test_a_killed_workers_status_expires(settings):
    status = {"name": "killed-worker", "host": "gone", "pid": 1, "updated_at": time.time(), "running": []}
    # the live one first: the killed one's short time to live must not cut the set's short
    assert publish_status(settings, {**status, "name": "another"}, ttl=30)
    # Seconds, not a fraction of one: on a loaded machine the listing may come a while after.
    assert publish_status(settings, status, ttl=5)
    assert [w["name"] for w in list_workers(settings)] == ["another", "killed-worker"]
    wait_for(lambda: [w["name"] for w in list_workers(settings)] == ["another"], timeout=60, step=0.2)
    # the reader pruned its name too; the other's forget takes both away
    from models.broker import redis_client
    from models.workers import forget, status_key

    redis = redis_client(settings)
    try:
        assert redis.zscore(registry_key(settings), "killed-worker") is None
        forget(settings, "another")
        assert list_workers(settings) == []
        assert not redis.exists(status_key(settings, "another"), registry_key(settings))
    finally:
        redis.close()


def test_publishing_never_raises_when_the_broker_is_away(settings):
    away = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    started = time.monotonic()
    assert publish_status(away, {"name": "w"}) is False
    assert time.monotonic() - started < 10
    # the in-process broker (the demo): nothing to publish to, nothing listed
    memory = settings.model_copy(update={"broker_url": "memory://"})
    assert publish_status(memory, {"name": "w"}) is False and list_workers(memory) == []


def test_top_once_without_workers_counts_queues_and_jobs(settings, client, clean_queues):
    from producer.cli import main

    interactive = [client.submit(small(prompt="a cat")) for _ in range(2)]
    bulk = client.submit(small(prompt="a dog"), priority="bulk")
    # a model no worker serves: its job waits in its own queue, counted by model
    other = client.submit(small(prompt="a sofa", model="sd21-base"))
    try:
        once = sdqueue("top", "--json")
        assert once.returncode == 0, once.stderr
        frame = json.loads(once.stdout)
        assert frame["errors"] == {} and frame["workers"] == []
        q = settings.queue
        assert frame["queues"] == {f"{q}.sd21-base": 1, f"{q}.tiny": 2, f"{q}.tiny.bulk": 1}
        assert frame["jobs"]["counts"]["queued"] >= 4 and frame["jobs"]["oldest_queued_s"] >= 0
        assert frame["jobs"]["queued_by_model"]["sd21-base"] >= 1 and frame["jobs"]["queued_by_model"]["tiny"] >= 3
        text = sdqueue("top", "--once").stdout
        assert "WORKERS 0" in text and "  none (a worker publishes" in text
        assert re.search(rf"^  {re.escape(q)}\.tiny\.bulk +1$", text, re.M), text
        assert re.search(rf"^  {re.escape(q)}\.sd21-base +1$", text, re.M), text
        assert re.search(r"^  queued by model: .*sd21-base [1-9]", text, re.M), text
        with pytest.raises(SystemExit) as refused:  # argparse's usage error, as for nan
            main(["top", "--once", "--interval", "0"])
        assert refused.value.code == 2
    finally:
        for job_id in [*interactive, bulk, other]:
            client.cancel(job_id)


def test_top_reads_no_worker_code_and_shows_a_source_that_is_away(settings, capsys):
    from tests.test_layout import NOT_FOR_READS, loaded_after

    # no Celery, torch, Alembic or boto3: it starts as fast as `sdqueue status`
    assert loaded_after("from producer.cli import main\nassert main(['top', '--once']) == 0\n",
                        ("worker",) + NOT_FOR_READS) == []
    # a broker that does not answer costs its sections only
    from producer.top import render, snapshot
    from producer.client import Client

    away = Client(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    try:
        frame = snapshot(away)
    finally:
        away.close()
    assert set(frame["errors"]) == {"workers", "queues"} and frame["jobs"] is not None
    text = "\n".join(render(frame))
    assert text.count("unavailable: ConnectionError") == 2 and "JOBS  queued" in text


def test_render_window_batching_and_a_stale_worker():
    from producer.top import render

    now = time.time()
    worker = {"name": "w1", "host": "h", "pid": 7, "model": "sd21", "device": "cuda:0", "dtype": "fp16",
              "batching": "window", "started_at": now - 3700, "updated_at": now - 12, "held": 2, "waiting": 1,
              "loops": [{"size": "768x768", "jobs": 1, "samples": 4}], "images_done": 40, "images_per_s": 1.5,
              "running": [{"job_id": "j1", "size": "768x768", "images": 4, "step": None, "steps": 25, "loop": 0}],
              "draining": True}
    frame = {"at": now, "queue": "q", "errors": {}, "workers": [worker], "queues": {"q": 0, "q.bulk": 5},
             "jobs": {"counts": {"queued": 5, "running": 1}, "oldest_queued_s": 4000.0}, "runs": []}
    lines = render(frame, width=60)
    assert all(len(line) <= 60 for line in lines)
    text = "\n".join(render(frame, width=200))
    assert "draining, last seen 0m12s ago, up 1h01m" in text
    assert "loop 768x768: 1 job(s), 4 sample(s)" in text and "      j1  x4  25 steps" in text
    assert "(oldest queued: 1h06m)" in text and "RUNS IN PROGRESS  none" in text


def test_the_reporter_under_window_batching_and_its_rate(settings, monkeypatch):
    from types import SimpleNamespace

    from worker import status as status_module
    from worker.samples import CompatKey
    from worker.batcher import Batcher, PixelBudget, Work
    from worker.quarantine import Health

    batch = [Work(f"job-{n}", CompatKey("img2img", 512, 768, 30, 6), [object()] * 2, 0.0) for n in range(2)]
    engine = SimpleNamespace(
        hostname="w-window", batching="window", on_gpu=batch, keeper=None, draining=False, images_done=0,
        batcher=Batcher(PixelBudget(512 * 768 * 8), 0.1), loops=None, health=Health(probe_interval=30), spool=None,
        model=SimpleNamespace(spec=SimpleNamespace(name="sd21"), device="cuda:0", dtype_name="float16"))
    clock = [1000.0]
    monkeypatch.setattr(status_module.time, "monotonic", lambda: clock[0])
    reporter = status_module.StatusReporter(settings.model_copy(update={"broker_url": "memory://"}), engine)
    try:
        first = reporter.status()
        assert first["loops"] == [{"size": "512x768", "jobs": 2, "samples": 4}]
        assert [(r["job_id"], r["step"], r["steps"]) for r in first["running"]] == [
            ("job-0", None, 24), ("job-1", None, 24)]
        assert first["images_per_s"] == 0.0 and first["held"] == 0 and first["waiting"] == 0
        assert first["quarantined"] is None and first["spool"] is None  # healthy, and no spool
        # 30 images in the first 10 s, then 60 in the next 60 s: the rate is over the last minute
        for seconds, done in ((10, 30), (70, 90)):
            clock[0], engine.images_done = 1000.0 + seconds, done
            rate = reporter.status()["images_per_s"]
        assert rate == pytest.approx(60 / 60, abs=0.05)
        engine.on_gpu = []
        assert reporter.status()["running"] == [] and reporter.status()["loops"] == []
        # a fault of its host: why, since when, and when it probes itself, as `sdqueue top` shows them
        engine.health.enter(SICK_REASON)
        quarantined = reporter.status()["quarantined"]
        assert quarantined["reason"] == SICK_REASON and quarantined["probes"] == 0
        assert quarantined["since"] <= time.time()
        assert quarantined["next_probe"] == pytest.approx(time.time() + 30, abs=5)
        engine.spool = SimpleNamespace(bytes=7, max_bytes=100, free_bytes=None, disk_full=True)
        assert reporter.status()["spool"] == {"bytes": 7, "max_bytes": 100, "free_bytes": None, "disk_full": True}
    finally:
        reporter.stop()


# A worker in quarantine, one whose spool's disk is full, and one too old to say either, as their
# statuses reach the registry (worker/status.py publishes these fields).
SICK_REASON = "a module cannot be imported (ModuleNotFoundError: No module named 'pyparsing')"


def out_of_service(now: float) -> list[dict[str, Any]]:
    base = {"host": "gpu-7", "pid": 4242, "model": "sd21", "device": "cuda:0", "dtype": "float16",
            "batching": "continuous", "started_at": now - 3600, "updated_at": now, "held": 0, "waiting": 0,
            "running": [], "loops": [], "images_done": 12, "images_per_s": 0.0, "draining": False}
    return [
        {**base, "name": "w-full", "quarantined": None,
         "spool": {"bytes": 35_200_000, "max_bytes": 10**9, "free_bytes": 12_000_000, "disk_full": True}},
        {**base, "name": "w-old"},
        {**base, "name": "w-sick", "quarantined": {"reason": SICK_REASON, "since": now - 130, "probes": 2,
                                                   "next_probe": now + 40},
         "spool": {"bytes": 0, "max_bytes": 10**9, "free_bytes": 50 * 10**9, "disk_full": False}},
    ]


def test_top_shows_a_quarantined_worker_and_a_full_spool_disk(settings, client):
    from models.workers import forget
    from producer.top import render, snapshot

    statuses = out_of_service(time.time())
    try:
        for status in statuses:
            assert publish_status(settings, status, ttl=120)

        # (a) the frame: the count in the header, then under each worker why it takes no work
        once = sdqueue("top", "--once")
        assert once.returncode == 0, once.stderr
        lines = once.stdout.splitlines()
        assert "WORKERS 3 (1 QUARANTINED, 1 spool disk full)   0.00 images/s" in lines, once.stdout

        def under(name: str) -> list[str]:
            start = next(n for n, line in enumerate(lines) if line.startswith(f"  {name}  "))
            end = next((n for n in range(start + 1, len(lines)) if not lines[n].startswith("    ")), len(lines))
            return lines[start:end]

        sick = under("w-sick")
        assert "(host gpu-7, pid 4242)  quarantined, up 1h00m" in sick[0]
        # 2m10s in quarantine and the third probe 40 s away, give or take the second the CLI took
        probe = r"    QUARANTINED 2m1\ds \(probe 3 in 0m[23]\ds\): "
        assert re.fullmatch(probe + re.escape(SICK_REASON), sick[1]), sick
        assert sick[2].startswith("    sd21 on cuda:0 float16 (continuous)  held 0") and sick[3] == "    idle"
        assert not any("spool" in line for line in sick)  # an empty spool on a roomy disk: nothing to say
        full = under("w-full")
        assert "  serving, up 1h00m" in full[0]
        assert full[1] == "    spool disk full (free 12 MB): no new batch starts; 35 MB spooled of 1.0 GB", full
        old = under("w-old")  # no quarantine or spool in its status: nothing said of either
        assert "  serving, up 1h00m" in old[0] and len(old) == 3

        # (b) --json: the statuses as published; a worker too old to say has them as null
        shown = sdqueue("top", "--json")
        assert shown.returncode == 0, shown.stderr
        workers = {w["name"]: w for w in json.loads(shown.stdout)["workers"]}
        assert workers["w-sick"]["quarantined"] == statuses[2]["quarantined"]
        assert workers["w-full"]["spool"] == statuses[0]["spool"] and workers["w-full"]["quarantined"] is None
        assert workers["w-old"]["quarantined"] is None and workers["w-old"]["spool"] is None

        # (c) a narrow terminal cuts lines, never the probe: it comes before the reason
        narrow = render(snapshot(client), width=48)
        assert all(len(line) <= 48 for line in narrow)
        assert any(re.fullmatch(r"    QUARANTINED 2m\d\ds \(probe 3 in 0m\d\ds\): a.*", line) for line in narrow)
    finally:
        for status in statuses:
            forget(settings, status["name"])


def test_render_a_spool_waiting_and_a_reason_that_is_no_terminals_business():
    from producer.top import render

    now = time.time()
    sick, full = out_of_service(now)[2], out_of_service(now)[0]
    sick = {**sick, "quarantined": {**sick["quarantined"], "reason": "CUDA error\x1b[2J\x1b[31m: ecc\nerror",
                                    "next_probe": now - 1}}
    waiting = {**full, "name": "w-waiting", "spool": {**full["spool"], "bytes": 3_500_000, "disk_full": False}}
    at_most = {**full, "name": "w-at-most", "spool": {**full["spool"], "bytes": 10**9, "disk_full": False}}
    frame = {"at": now, "queue": "q", "errors": {}, "workers": [sick, waiting, at_most], "queues": {"q": 0},
             "jobs": {"counts": {}, "oldest_queued_s": None}, "runs": []}
    text = "\n".join(render(frame, width=200))
    assert "\x1b" not in text
    assert "QUARANTINED 2m10s (probe 3 due now): CUDA error\\x1b[2J\\x1b[31m: ecc error" in text
    assert "    3.5 MB spooled of 1.0 GB for the object store" in text
    assert "    spool full: no new batch starts; 1.0 GB spooled of 1.0 GB for the object store" in text
    assert "WORKERS 3 (1 QUARANTINED)   0.00 images/s" in text
