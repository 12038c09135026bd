"""The whole path with real parts: producer -> Redis -> Celery worker -> S3 + PostgreSQL."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text

from models.db import normalize_url
from tests.conftest import BUCKET, small
from tests.servers import s3_client
from worker.encode import read_record, sha256_of

TIMEOUT = 180


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def s3_object(settings, key: str) -> bytes:  # type: ignore[no-untyped-def]
    prefix = settings.storage_url.removeprefix(f"s3://{BUCKET}/")
    return s3_client(settings.s3_endpoint_url).get_object(Bucket=BUCKET, Key=f"{prefix}/{key}")["Body"].read()


def image_rows(settings, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    engine = create_engine(normalize_url(settings.database_url))
    with engine.connect() as conn:
        rows = conn.execute(
            text('SELECT "index", seed, object_key, sha256, size_bytes, width, height, batch_id '
                 "FROM images WHERE job_id = :id ORDER BY \"index\""), {"id": job_id}
        ).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def test_client_job_reaches_s3_and_database(settings, client, worker):
    job_id = client.submit(small(prompt="a red bicycle", negative_prompt="blurry", num_images=4, seed=5,
                                 guidance_scale=6.0))
    record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 1 and record["model"] == "tiny"
    rows = image_rows(settings, job_id)
    assert [r["seed"] for r in rows] == [5, 6, 7, 8]
    assert [r["object_key"] for r in rows] == [f"images/{job_id}/1/{i}.png" for i in range(4)]  # claim 1
    arrays = []
    for row in rows:
        png = s3_object(settings, row["object_key"])
        assert sha256_of(png) == row["sha256"] and len(png) == row["size_bytes"]
        assert (row["width"], row["height"]) == (256, 256) and row["batch_id"]
        embedded = read_record(png)
        assert embedded["seed"] == row["seed"] and embedded["job_id"] == job_id
        assert embedded["prompt"] == "a red bicycle" and embedded["negative_prompt"] == "blurry"
        assert embedded["guidance_scale"] == 6.0 and embedded["num_inference_steps"] == 3
        assert embedded["model"] == "tiny" and embedded["model_revision"].startswith("sha256:")
        assert embedded["scheduler"] == "EulerDiscreteScheduler" and "torch" in embedded["versions"]
        arrays.append(pixels(png))
    # four distinct images
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(arrays[i] - arrays[j]).max() > 10


def test_cli_submit_status_wait_fetch(settings, worker, tmp_path):
    def sdqueue(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                              timeout=TIMEOUT)

    submitted = sdqueue("submit", "--prompt", "a lighthouse", "--width", "320", "--height", "256",
                        "--num-inference-steps", "2", "--num-images", "2", "--seed", "11", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    # the record as read back just after the enqueue: a fast worker may have claimed it already
    assert job["state"] in ("queued", "running", "succeeded") and job["seed"] == 11
    waited = sdqueue("wait", job["id"], "--timeout", str(TIMEOUT))
    assert waited.returncode == 0, waited.stdout + waited.stderr
    status = sdqueue("status", job["id"], "--json")
    record = json.loads(status.stdout)
    assert record["state"] == "succeeded"
    assert [(i["seed"], i["key"]) for i in record["images"]] == [
        (11, f"images/{job['id']}/1/0.png"), (12, f"images/{job['id']}/1/1.png")]
    assert record["images"][0]["location"].startswith("s3://")
    fetched = sdqueue("fetch", job["id"], str(tmp_path / "out"))
    assert fetched.returncode == 0, fetched.stderr
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"{job['id']}-0.png", f"{job['id']}-1.png"]
    with Image.open(files[0]) as img:
        assert img.size == (320, 256)
    human = sdqueue("status", job["id"])
    assert "succeeded" in human.stdout and "seed=11" in human.stdout


def test_img2img_from_uploaded_image(settings, client, worker, png_bytes):
    source = png_bytes(300, 200)
    job_id = client.submit(small(prompt="a planet", image=source, strength=0.6, seed=2))
    record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded", record["error"]
    assert record["mode"] == "img2img" and record["input_key"] == f"inputs/{job_id}/input"
    assert s3_object(settings, record["input_key"]) == source
    png = s3_object(settings, record["images"][0]["key"])
    assert read_record(png)["input_sha256"] == sha256_of(source)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (256, 256)
    # strength 0 keeps the input (resized to the output size): no denoising step runs
    kept = client.wait(client.submit(small(prompt="a planet", image=source, strength=0.0, seed=2)), timeout=TIMEOUT)
    with Image.open(io.BytesIO(source)) as img:
        expected = np.asarray(img.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.array_equal(pixels(s3_object(settings, kept["images"][0]["key"])), expected)
    # and the image changes the result: same seed, prompt and size without it differs
    plain = client.wait(client.submit(small(prompt="a planet", seed=2)), timeout=TIMEOUT)
    assert np.abs(pixels(png) - pixels(s3_object(settings, plain["images"][0]["key"]))).max() > 10


def test_compel_weighted_and_blended_prompts(settings, client, worker):
    def run(**fields) -> np.ndarray:  # type: ignore[no-untyped-def]
        record = client.wait(client.submit(small(seed=9, **fields)), timeout=TIMEOUT)
        assert record["state"] == "succeeded", record["error"]
        return pixels(s3_object(settings, record["images"][0]["key"]))

    weighted = run(prompt="a (red)++ cat", use_compel=True)
    as_text = run(prompt="a (red)++ cat")  # without compel the syntax is just characters
    blended = run(prompt='("a cat", "a dog").blend(0.5, 0.5)', use_compel=True)
    cat = run(prompt="a cat", use_compel=True)
    assert np.abs(weighted - as_text).max() > 0
    assert np.abs(blended - cat).max() > 0


def test_resubmitting_recorded_parameters_reproduces_pixels(settings, client, worker):
    first = client.wait(client.submit(small(prompt="a quiet harbour", num_images=2)), timeout=TIMEOUT)
    assert first["state"] == "succeeded" and first["seed_was_drawn"]
    again = client.wait(client.submit({**first["params"]}), timeout=TIMEOUT)
    assert again["seed"] == first["seed"] and not again["seed_was_drawn"]
    for a, b in zip(first["images"], again["images"]):
        assert a["seed"] == b["seed"]
        assert np.array_equal(pixels(s3_object(settings, a["key"])), pixels(s3_object(settings, b["key"])))


def test_cancel_a_queued_job(settings, client):
    job_id = client.submit(small(prompt="never mind"))  # no worker on this test's queue
    result = subprocess.run([sys.executable, "-m", "producer.cli", "cancel", job_id], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"{job_id} cancelled"
    assert client.get(job_id)["state"] == "cancelled"
    again = subprocess.run([sys.executable, "-m", "producer.cli", "cancel", job_id], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 1 and "is cancelled: it cannot become cancelled" in again.stderr
    missing = subprocess.run([sys.executable, "-m", "producer.cli", "status", "no-such-job"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 3 and "no job with id 'no-such-job'" in missing.stderr
