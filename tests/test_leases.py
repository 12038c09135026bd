"""A real worker (in this process) on Redis, PostgreSQL and S3: second deliveries, cancellation of a
running job, and jobs that fail by themselves."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from models.constants import GENERATE_TASK
from tests.conftest import BUCKET, counting_unet_calls, failing_unet, interactive_queue, small, wait_for
from tests.servers import s3_client
from tests.test_end_to_end import pixels, s3_object

TIMEOUT = 180


def stored_keys(settings, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    prefix = settings.storage_url.removeprefix(f"s3://{BUCKET}/")
    listed = s3_client(settings.s3_endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/images/{job_id}/")
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture
def unet_calls(worker):  # type: ignore[no-untyped-def]
    """The rows of every UNet call the worker's engine makes (2 per sample: guidance)."""
    from worker.tasks import generate

    with counting_unet_calls(generate.context.engine) as calls:
        yield calls


def test_a_second_delivery_of_a_running_or_ended_job_does_nothing(settings, client, worker, unet_calls):
    job_id = client.submit(small(prompt="a slow river", num_inference_steps=60, seed=3))
    wait_for(lambda: client.get(job_id)["state"] == "running")
    for _ in range(2):  # delivered again while it runs
        client.sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=interactive_queue(settings))
    record = client.wait(job_id, timeout=TIMEOUT)
    client.sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=interactive_queue(settings))  # and after
    time.sleep(1.0)
    again = client.get(job_id)
    assert record["state"] == again["state"] == "succeeded" and again["attempts"] == 1
    assert again["images"] == record["images"]
    assert len(unet_calls) == 60  # denoised once
    assert stored_keys(settings, job_id) == [f"{settings.storage_url.removeprefix(f's3://{BUCKET}/')}/images/{job_id}/1/0.png"]


def test_a_job_claimed_again_by_its_own_worker_keeps_the_new_claim(settings, client, worker, unet_calls):
    """Taken back while its claim is in the loop (as a sweeper does after an outage) and its message
    delivered to the same worker again: the stale claim leaves the loop, the new one runs (lost
    claims are tracked by lease, not by job: the new claim is not dropped for the old one's loss)."""
    from models import jobs
    from worker.tasks import generate

    engine = generate.context.engine
    job_id = client.submit(small(prompt="a long road", num_inference_steps=60, seed=8))
    wait_for(lambda: len(unet_calls) >= 3)
    with client.db.session() as session:
        assert jobs.release(session, engine.hostname, [job_id]) == [job_id]
    client.sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=interactive_queue(settings))
    record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded" and record["attempts"] == 2 and record["failures"] == 0, record
    assert [image["key"].split("/")[-2] for image in record["images"]] == ["2"]  # the new claim's objects


def test_a_cancelled_running_job_leaves_the_loop_and_its_mate_carries_on(settings, client, worker, unet_calls):
    steps = 80
    mate = small(prompt="a lighthouse", num_inference_steps=steps, seed=21)
    doomed_id = client.submit(small(prompt="a shipwreck", num_inference_steps=steps, seed=22, num_images=2))
    mate_id = client.submit(mate)
    wait_for(lambda: unet_calls.count(6) >= 3)  # both in one loop: 3 samples, 6 rows
    client.cancel(doomed_id)
    cancelled_at = len(unet_calls)
    record = client.wait(mate_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded"
    left = unet_calls.index(2, unet_calls.index(6))  # from here on only the mate's rows
    assert left - cancelled_at <= 3, (left, cancelled_at)  # within a step or two of the notice
    assert unet_calls[left:] == [2] * (len(unet_calls) - left)
    assert sum(rows in (2, 6) for rows in unet_calls) == steps  # the mate's calls (the doomed alone: 4 rows)
    time.sleep(1.0)
    doomed = client.get(doomed_id)
    assert doomed["state"] == "cancelled" and doomed["images"] == []
    assert stored_keys(settings, doomed_id) == []  # none of its images was uploaded
    # the mate's image is the one it makes alone
    alone = client.wait(client.submit(mate), timeout=TIMEOUT)
    assert np.abs(pixels(s3_object(settings, record["images"][0]["key"]))
                  - pixels(s3_object(settings, alone["images"][0]["key"]))).max() <= 1


@pytest.mark.parametrize("prompt, message", [
    ('("a cat", "a dog").blend(0, 0)', "gives text conditioning that is not finite (NaN or inf)"),
    ('("a cat", "a dog").blend(0.5)', "cannot be parsed by compel (ParsingException: while parsing Blend"),
    ("(" * 1900 + "cat" + ")" * 1900, "cannot be parsed by compel (nested too deeply)"),
])
def test_a_job_that_fails_by_itself_fails_at_once_alone(settings, client, worker, prompt, message):
    bad_id = client.submit(small(prompt=prompt, use_compel=True, seed=1))
    good_id = client.submit(small(prompt="a fine day", use_compel=True, seed=1))
    bad, good = client.wait(bad_id, timeout=TIMEOUT), client.wait(good_id, timeout=TIMEOUT)
    assert good["state"] == "succeeded" and good["failures"] == 0
    assert bad["state"] == "failed" and bad["attempts"] == 1 and not bad["dead_letter"], bad
    assert message in bad["error"] and bad["images"] == []


def test_an_unexpected_error_is_retried_then_dead_lettered(settings, client, worker, monkeypatch):
    from worker.tasks import generate

    engine = generate.context.engine
    monkeypatch.setattr(engine.settings, "max_attempts", 2)
    with failing_unet(lambda: RuntimeError("the model cannot take this input (simulated)")):
        job_id = client.submit(small(prompt="an unlucky job", seed=4))
        record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "failed" and record["dead_letter"] and record["failures"] == 2
    assert record["attempts"] == 2 and "cannot take this input" in record["error"]
    assert record["error"].startswith("dead-lettered after 2 failed attempts")
    shown = subprocess.run([sys.executable, "-m", "producer.cli", "status", job_id], capture_output=True, text=True,
                           timeout=120)
    assert "state    failed  (attempts 2, failures 2, dead letter)" in shown.stdout, shown.stdout + shown.stderr
