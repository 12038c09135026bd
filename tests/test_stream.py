"""A score of mixed jobs through Redis and a worker, batching continuously (each image checked
against its job made alone) and in windows (a batch replayed from its record)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from models.db import Database
from models.tables import Batch
from tests.conftest import small
from worker.samples import compat_key

TIMEOUT = 300


def mixed_requests(count: int, png: bytes) -> list[dict]:
    rng = random.Random(5)
    prompts = ["a red fox", "a quiet harbour", "a (blue)++ house", '("a cat", "a dog").blend(0.7, 0.3)', "a tree"]
    requests = []
    for i in range(count):
        prompt = rng.choice(prompts)
        request = small(
            prompt=prompt, use_compel=prompt.startswith(("(", "a (")) or rng.random() < 0.2,
            width=rng.choice([256, 320]), num_inference_steps=rng.choice([2, 3]), num_images=rng.randint(1, 4),
            guidance_scale=rng.choice([1.0, 5.0, 7.5, 12.0]), negative_prompt=rng.choice(["", "blurry"]),
            seed=rng.randrange(10_000),
        )
        if i % 5 == 0:
            request.update(image=png, strength=rng.choice([0.5, 0.6]))
        requests.append(request)
    return requests


@pytest.fixture(params=["continuous", "window"])
def batching(request, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SDQUEUE_BATCHING", request.param)
    return request.param


def test_mixed_stream_all_succeed_in_shared_batches(batching, settings, client, worker, png_bytes):
    from worker.tasks import generate

    assert settings.batching == batching
    requests = mixed_requests(20, png_bytes(256, 256))
    job_ids = [client.submit(r) for r in requests]
    records = [client.wait(job_id, timeout=TIMEOUT) for job_id in job_ids]
    for request, record in zip(requests, records):
        assert record["state"] == "succeeded", record["error"]
        assert [i["seed"] for i in record["images"]] == [request["seed"] + i for i in range(request["num_images"])]
        assert all(i["batch_id"] for i in record["images"])

    db = Database(settings.database_url)
    with db.session() as session:
        batches = session.scalars(select(Batch).where(Batch.id.in_(
            {i["batch_id"] for r in records for i in r["images"]}))).all()
    assert sum(b.size for b in batches) == sum(r["num_images"] for r in requests)
    ctx = generate.context
    if batching == "window":
        assert all(i["batch_size"] >= q["num_images"] for q, r in zip(requests, records) for i in r["images"])
        shared = max(batches, key=lambda b: (b.jobs, b.size))
        assert shared.jobs > 1  # jobs from different submits ran in one loop
        replay_most_shared(ctx, db, records, shared)
    else:
        # samples of different steps, strengths and guidance shared calls; each image is the one
        # its job makes alone
        assert max(i["shared_max"] for r in records for i in r["images"]) > 4
        for request, record in zip(requests, records):
            key = compat_key(request, "image" in request)
            assert all(i["steps_run"] == key.steps - key.start_step for i in record["images"])
        for request, record in list(zip(requests, records))[::4]:
            made = made_alone(ctx, db, record["id"])
            for image, pixels in zip(record["images"], made):
                with Image.open(io.BytesIO(ctx.storage.get(image["key"]))) as img:
                    assert np.abs(np.asarray(img.convert("RGB")).astype(int) - pixels.astype(int)).max() <= 1
    db.dispose()


def made_alone(ctx, db, job_id: str) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """The job's images, made again by the worker's batch function with no other job."""
    from models.tables import Job
    from worker.samples import job_samples
    from worker.inputs import prepare_input_image

    with db.session() as session:
        job = session.get(Job, job_id)
        params, seed, input_key = dict(job.params), job.seed, job.input_key
    init = None
    if input_key is not None:
        init = prepare_input_image(ctx.storage.get(input_key), params["width"], params["height"])
    samples = job_samples(job_id, params, seed, init)
    key = compat_key(params, init is not None)
    return ctx.engine.generate(key, samples, ctx.engine.conditioning.get([s.prompt for s in samples]))


def replay_most_shared(ctx, db, records, shared) -> None:  # type: ignore[no-untyped-def]
    """Replay the most shared batch from its record: identical pixels."""
    from worker.replay import replay_batch

    replayed = replay_batch(ctx.engine, db, ctx.storage, shared.id)
    stored = [(i["batch_position"], i["key"]) for r in records for i in r["images"] if i["batch_id"] == shared.id]
    for position, key in sorted(stored):
        with Image.open(io.BytesIO(ctx.storage.get(key))) as img:
            assert np.array_equal(np.asarray(img.convert("RGB")), replayed[position])
