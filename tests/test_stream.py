"""A few dozen mixed jobs through Redis and a batching worker; then a batch replayed from its record."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image
from sqlalchemy import select

from models.db import Database
from models.tables import Batch
from tests.conftest import small

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


def test_mixed_stream_all_succeed_in_shared_batches(settings, client, worker, png_bytes):
    from worker.replay import replay_batch
    from worker.tasks import generate

    requests = mixed_requests(36, png_bytes(256, 256))
    job_ids = [client.submit(r) for r in requests]
    records = [client.wait(job_id, timeout=TIMEOUT) for job_id in job_ids]
    for request, record in zip(requests, records):
        assert record["state"] == "succeeded", record["error"]
        assert [i["seed"] for i in record["images"]] == [request["seed"] + i for i in range(request["num_images"])]
        assert all(i["batch_id"] and i["batch_size"] >= request["num_images"] for i in record["images"])

    db = Database(settings.database_url)
    with db.session() as session:
        batches = session.scalars(select(Batch).where(Batch.id.in_(
            {i["batch_id"] for r in records for i in r["images"]}))).all()
    assert sum(b.size for b in batches) == sum(r["num_images"] for r in requests)
    shared = max(batches, key=lambda b: (b.jobs, b.size))
    assert shared.jobs > 1  # jobs from different submits ran in one loop

    # replay the most shared batch from its record: identical pixels
    ctx = generate.context
    replayed = replay_batch(ctx.engine, db, ctx.storage, shared.id)
    stored = [(i["batch_position"], i["key"]) for r in records for i in r["images"] if i["batch_id"] == shared.id]
    for position, key in sorted(stored):
        with Image.open(io.BytesIO(ctx.storage.get(key))) as img:
            assert np.array_equal(np.asarray(img.convert("RGB")), replayed[position])
    db.dispose()
