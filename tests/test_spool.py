"""S3 away: finished images wait in the bounded spool, the worker stops taking work when it is full,
and everything is uploaded when S3 returns, without denoising again."""

from __future__ import annotations

import time

import pytest

from tests.conftest import counting_unet_calls, small, wait_for
from tests.servers import SeaweedServer, s3_client

TIMEOUT = 180


@pytest.fixture
def private_s3(tmp_path):  # type: ignore[no-untyped-def]
    with SeaweedServer(tmp_path / "s3") as server:
        s3_client(server.endpoint).create_bucket(Bucket="spool")
        yield server


def test_images_wait_in_the_spool_while_s3_is_down(settings_env, private_s3, monkeypatch, tmp_path):
    from celery.contrib.testing.worker import start_worker

    from models.settings import load_settings
    from producer.client import Client
    from worker.app import configure
    from worker.tasks import generate, reset_context

    monkeypatch.setenv("SDQUEUE_STORAGE_URL", "s3://spool/run")
    monkeypatch.setenv("SDQUEUE_S3_ENDPOINT_URL", private_s3.endpoint)
    monkeypatch.setenv("SDQUEUE_PIXEL_BUDGET", str(256 * 256))  # one job per batch
    monkeypatch.setenv("SDQUEUE_SPOOL_MAX_BYTES", "1")  # full with the first job's images
    monkeypatch.setenv("SDQUEUE_SPOOL_DIR", str(tmp_path / "spool"))
    settings = load_settings()
    client = Client(settings)
    app = configure(settings)
    reset_context()
    engine = generate.context.engine
    try:
        with counting_unet_calls(engine) as calls, start_worker(
                app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=120,
                queues=[settings.queue]):
            private_s3.stop()
            job_ids = [client.submit(small(prompt=f"a lighthouse {i}", seed=i, num_inference_steps=3)) for i in range(6)]
            wait_for(lambda: len(engine.spool), timeout=TIMEOUT)
            time.sleep(3.0)  # batches that ran while the first upload was failing land in the spool too
            denoised = len(calls)
            time.sleep(3.0)
            # the spool is full: no batch starts any more; what was denoised waits in it
            assert len(calls) == denoised < 18 and len(engine.spool) == denoised // 3
            assert {client.get(job_id)["state"] for job_id in job_ids} <= {"queued", "running"}  # none recorded
            private_s3.start()
            records = [client.wait(job_id, timeout=TIMEOUT) for job_id in job_ids]
    finally:
        reset_context()
        client.close()
    assert [r["state"] for r in records] == ["succeeded"] * 6
    assert len(calls) == 18  # each job denoised once: 3 steps each
    assert all(r["attempts"] == 1 for r in records)
    listed = s3_client(private_s3.endpoint).list_objects_v2(Bucket="spool", Prefix="run/images/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(f"run/{r['images'][0]['key']}" for r in records)
    assert list((tmp_path / "spool").rglob("*.part")) == []  # nothing left behind on disk
