"""`sdqueue worker` shut down as operators do: SIGTERM drains, a second signal stops now."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from models.events import Subscription
from tests.conftest import small, wait_for

TIMEOUT = 240


@pytest.fixture(autouse=True)
def standin(settings_env, monkeypatch):  # type: ignore[no-untyped-def]
    """The stand-in GPU for these workers: a step of one 256x256 image takes about 0.07 s, so a job
    of 60 steps is still denoising when the signal comes, and no CPU goes to it."""
    monkeypatch.setenv("SDQUEUE_MODEL", "standin")
    monkeypatch.setenv("SDQUEUE_STANDIN_SCALE", "5")


def start_worker(tmp_path, name: str) -> tuple[subprocess.Popen, object]:  # type: ignore[no-untyped-def]
    log = open(tmp_path / f"{name}.log", "wb")
    # One 256x256 image per batch: the other jobs a worker holds wait their turn in its batcher.
    env = {**os.environ, "SDQUEUE_PIXEL_BUDGET": str(256 * 256), "SDQUEUE_WORKER_SLOTS": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    return proc, log


def held_by_worker(client, job_ids):  # type: ignore[no-untyped-def]
    records = [client.get(job_id) for job_id in job_ids]
    return all(r["state"] == "running" for r in records)


@pytest.mark.parametrize("second", [None, signal.SIGTERM, signal.SIGQUIT])
def test_shutdown_gives_back_what_did_not_start(settings_env, client, tmp_path, request, second):
    proc, log = start_worker(tmp_path, "worker")
    try:
        job_ids = [client.submit(small(prompt=f"a long night {i}", num_inference_steps=60, seed=i)) for i in range(4)]
        with Subscription(client.settings, job_ids) as events:
            wait_for(lambda: held_by_worker(client, job_ids))  # all four claimed
            # and one of them denoising (claimed is not yet started: CI once signalled in between)
            wait_for(lambda: (events.get(timeout=1) or {}).get("type") == "progress", timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        if second is not None:
            time.sleep(0.5)
            proc.send_signal(second)
        stopped = time.monotonic()
        # the jobs not started are back in the queue at once, not after a lease or a timeout
        expected = 3 if second is None else 4
        wait_for(lambda: sum(client.get(job_id)["state"] == "queued" for job_id in job_ids) >= expected, timeout=10)
        assert time.monotonic() - stopped < 10
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in text and "NotImplementedError" not in text, text[-3000:]
    records = [client.get(job_id) for job_id in job_ids]
    if second is None:  # the batch in hand finished
        assert sorted(r["state"] for r in records) == ["queued", "queued", "queued", "succeeded"]
    else:
        assert all(r["state"] == "queued" and r["failures"] == 0 for r in records), records
    # another worker takes them: the messages were sent again, and nobody was charged
    request.getfixturevalue("worker")
    for job_id in job_ids:
        record = client.wait(job_id, timeout=TIMEOUT)
        assert record["state"] == "succeeded" and record["failures"] == 0 and not record["dead_letter"]
