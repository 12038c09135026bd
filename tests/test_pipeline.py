"""The worker's pipeline on the tiny model, loaded through from_pretrained; and its failures."""

from __future__ import annotations

import uuid

import pytest

from models.db import Database, upgrade
from models.errors import ModelUnavailable
from models.registry import REGISTRY, resolve_model
from models.settings import load_settings
from models.storage import input_key_for, open_storage
from models.tables import Job


def params(**fields):  # type: ignore[no-untyped-def]
    base = {"prompt": "a cat", "negative_prompt": "", "num_images": 1, "num_inference_steps": 3,
            "guidance_scale": 7.5, "strength": 0.8, "width": 256, "height": 256, "use_compel": False}
    return {**base, **fields}


def test_tiny_model_is_the_sd21_shape(model):
    assert model.dtype_name == "float32" and model.device == "cpu"
    assert model.txt2img.scheduler.config.prediction_type == "v_prediction"
    assert model.txt2img.unet.config.use_linear_projection and model.txt2img.text_encoder.config.hidden_act == "gelu"
    assert model.txt2img.vae_scale_factor == 8 and model.txt2img.tokenizer.model_max_length == 77
    assert model.revision and model.revision.startswith("sha256:")


def test_hub_weights_that_cannot_be_reached_are_a_plain_error(tmp_path, monkeypatch):
    from worker.pipeline import locate_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable, match="stabilityai/stable-diffusion-2-1\\) cannot be reached.*SDQUEUE_MODEL"):
        locate_weights(REGISTRY["sd21"])


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(ModelUnavailable, match="neither a registry name"):
        resolve_model("sd15", tmp_path)


def test_a_local_folder_is_a_model(data_dir):
    spec = resolve_model(str(data_dir / "models" / "tiny"), data_dir)
    assert spec.prediction_type == "v_prediction" and spec.local_dir is not None and spec.name == "tiny"


@pytest.fixture
def ctx(model, data_dir, tmp_path):  # type: ignore[no-untyped-def]
    """A worker's context on the tiny model, SQLite and local files: run_job runs a job end to end."""
    from worker.engine import Engine
    from worker.tasks import WorkerContext

    settings = load_settings(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                             storage_url=(tmp_path / "objects").as_uri(), model="tiny")
    upgrade(settings.database_url)
    db, storage = Database(settings.database_url), open_storage(settings.storage_url)
    engine = Engine(model, db, storage, "test", pixel_budget=256 * 320, window=0)
    engine.serve(settings, send=lambda job_ids, queue: None)
    context = WorkerContext(settings, db, storage, engine)
    yield context
    context.close()


def test_a_job_that_cannot_run_is_failed_with_its_error(ctx):
    from worker.tasks import run_job

    job_id = str(uuid.uuid4())
    ctx.storage.put(input_key_for(job_id), b"corrupted after upload")
    with ctx.db.session() as session:
        session.add(Job(id=job_id, mode="img2img", params={**params(), "seed": 1}, seed=1, width=256, height=256,
                        num_inference_steps=3, num_images=1, input_key=input_key_for(job_id)))
    assert run_job(ctx, job_id) == "failed"
    with ctx.db.session() as session:
        job = session.get(Job, job_id)
        assert job.state == "failed" and "UnidentifiedImageError" in job.error and job.finished_at
        assert job.error.startswith("the input image cannot be read") and not job.dead_letter
    assert run_job(ctx, job_id) == "skipped"  # a redelivered message for an ended job does nothing


def test_a_database_away_mid_message_runs_what_was_claimed_and_leaves_the_rest_to_others(ctx, monkeypatch):
    """A message of three jobs: the first is claimed, then the database stays away longer than a
    worker waits (SDQUEUE_OUTAGE_TIMEOUT, here half a second): the first runs, the other two are
    sent again unclaimed, in one send, and nothing is charged. With nothing claimed, the message
    goes back whole."""
    import worker.tasks as tasks
    from models.errors import ServiceUnavailable
    from models.outage import OutageTooLong

    job_ids = []
    for seed in (1, 2, 3):
        job_ids.append(str(uuid.uuid4()))
        with ctx.db.session() as session:
            session.add(Job(id=job_ids[-1], mode="txt2img", params={**params(), "seed": seed}, seed=seed, width=256,
                            height=256, num_inference_steps=2, num_images=1))
    claim, calls = tasks._claim, []

    def away_after_one(context, job_id):  # type: ignore[no-untyped-def]
        calls.append(job_id)
        if len(calls) > 1:
            raise ServiceUnavailable("database sqlite:///db.sqlite cannot be reached")
        return claim(context, job_id)

    sent: list[list[str]] = []
    monkeypatch.setattr(tasks, "_claim", away_after_one)
    monkeypatch.setattr(ctx, "settings", ctx.settings.model_copy(update={"outage_timeout": 0.5}))
    monkeypatch.setattr(ctx.engine, "send_again", lambda ids, queue=None: sent.append(list(ids)))
    assert tasks.run_jobs(ctx, job_ids) == ["succeeded", "handed back", "handed back"]
    assert sent == [job_ids[1:]] and calls[0] == job_ids[0] and set(calls[1:]) == {job_ids[1]}  # 2: retried
    with ctx.db.session() as session:
        assert [(session.get(Job, j).state, session.get(Job, j).failures) for j in job_ids] == [
            ("succeeded", 0), ("queued", 0), ("queued", 0)]

    with pytest.raises(OutageTooLong):  # the database away from the first claim on
        tasks.run_jobs(ctx, job_ids[1:])
    assert sent == [job_ids[1:]]  # nothing more sent: the message itself goes back to the queue


# img2img inputs are used upright: a phone's portrait is stored sideways with an EXIF orientation


RED, BLUE = (220, 30, 30), (30, 30, 220)


def red_on_top(width: int = 256, height: int = 320):  # type: ignore[no-untyped-def]
    """An upright picture: its top half red, its bottom half blue."""
    from PIL import Image

    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width, height // 2))
    return img


def jpeg(img, orientation: int | None = None) -> bytes:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # Orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def red_side(img) -> str:  # type: ignore[no-untyped-def]
    """Which half of the picture is the red one: top, bottom, left or right."""
    import numpy as np

    pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    red = pixels[..., 0] - pixels[..., 2]  # > 0 where red
    h, w = red.shape
    halves = {"top": red[: h // 2], "bottom": red[h // 2:], "left": red[:, : w // 2], "right": red[:, w // 2:]}
    return max(halves, key=lambda side: float(halves[side].mean()))




def run_img2img(ctx, data: bytes, strength: float, seed: int = 3):  # type: ignore[no-untyped-def]
    """Run an img2img job of 256x320 from the input file `data`; its image and the PNG's record."""
    import io

    from PIL import Image
    from sqlalchemy import select

    from models.tables import Image as ImageRow
    from worker.encode import read_record
    from worker.tasks import run_job

    job_id = str(uuid.uuid4())
    ctx.storage.put(input_key_for(job_id), data)
    with ctx.db.session() as session:
        session.add(Job(id=job_id, mode="img2img", params={**params(width=256, height=320, strength=strength), "seed": seed},
                        seed=seed, width=256, height=320, num_inference_steps=3, num_images=1,
                        input_key=input_key_for(job_id)))
    assert run_job(ctx, job_id) == "succeeded"
    assert ctx.storage.get(input_key_for(job_id)) == data  # the user's bytes stay as they were
    with ctx.db.session() as session:
        [row] = session.scalars(select(ImageRow).where(ImageRow.job_id == job_id)).all()
        key = row.object_key
    png = ctx.storage.get(key)
    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB"), read_record(png)


@pytest.mark.parametrize("orientation, stored_as", [
    (6, "ROTATE_90"),  # the sensor's landscape, shown turned 90 degrees clockwise
    (8, "ROTATE_270"),  # ... turned 90 degrees counter-clockwise
    (3, "ROTATE_180"),  # upside down
])
def test_an_img2img_input_is_used_upright_by_its_exif_orientation(ctx, orientation, stored_as):
    from PIL import Image

    stored = red_on_top().transpose(getattr(Image.Transpose, stored_as))
    assert red_side(stored) != "top"
    # strength 0 keeps the prepared input: the image made shows what the pipeline was given
    kept, record = run_img2img(ctx, jpeg(stored, orientation), strength=0.0)
    assert kept.size == (256, 320) and red_side(kept) == "top"
    assert record["input_orientation"] == orientation
    # the same bytes without the tag are used as stored
    sideways, record = run_img2img(ctx, jpeg(stored), strength=0.0)
    assert red_side(sideways) == red_side(stored.resize((256, 320))) != "top"
    assert record["input_orientation"] == 1


def test_the_denoising_path_gets_the_upright_input(ctx):
    """Through the tiny model's img2img: the tagged JPEG gives the same image as the upright
    pixels given as a plain PNG, and another image than the same JPEG without its tag."""
    import io

    from PIL import Image, ImageOps

    from tests.conftest import max_diff

    data = jpeg(red_on_top().transpose(Image.Transpose.ROTATE_90), 6)
    with Image.open(io.BytesIO(data)) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")  # Pillow's own turn, for reference
    buf = io.BytesIO()
    upright.save(buf, format="PNG")
    made, record = run_img2img(ctx, data, strength=0.6)
    reference, plain_record = run_img2img(ctx, buf.getvalue(), strength=0.6)
    assert max_diff(made, reference) <= 1
    assert (record["input_orientation"], plain_record["input_orientation"]) == (6, 1)
    untagged, _ = run_img2img(ctx, jpeg(red_on_top().transpose(Image.Transpose.ROTATE_90)), strength=0.6)
    assert max_diff(made, untagged) > 10


def test_a_prepared_input_is_the_same_every_time_and_a_plain_one_is_unchanged(png_bytes):
    import io

    import numpy as np
    from PIL import Image

    from worker.inputs import input_orientation, prepare_input_image

    data = jpeg(red_on_top().transpose(Image.Transpose.ROTATE_270), 8)
    first, again = prepare_input_image(data, 256, 320), prepare_input_image(data, 256, 320)  # a re-run turns it alike
    assert np.array_equal(np.asarray(first), np.asarray(again)) and red_side(first) == "top"
    assert input_orientation(first) == 8 and input_orientation(None) is None
    plain = png_bytes(300, 200)
    with Image.open(io.BytesIO(plain)) as img:
        expected = img.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)
    prepared = prepare_input_image(plain, 256, 256)
    assert np.array_equal(np.asarray(prepared), np.asarray(expected)) and input_orientation(prepared) == 1


def test_torch_threads_are_the_cores_shared_by_the_workers_of_the_host(monkeypatch):
    import os

    import torch

    from worker.pipeline import auto_torch_threads, pin_torch_threads

    # automatic (SDQUEUE_TORCH_THREADS=0): usable cores // SDQUEUE_WORKERS_PER_HOST, at least 1
    assert [auto_torch_threads(c, w) for c, w in ((2, 1), (2, 2), (8, 3), (1, 4), (16, 16))] == [2, 1, 2, 1, 1]
    before = torch.get_num_threads()
    try:
        assert pin_torch_threads(1, 1, "cpu") == torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})  # a cpuset of 6 cores
        assert pin_torch_threads(0, 4, "cpu") == torch.get_num_threads() == 1
        assert pin_torch_threads(0, 2, "cpu") == torch.get_num_threads() == 3
        assert pin_torch_threads(5, 2, "cuda") == torch.get_num_threads() == 3  # CUDA: left as torch has it
    finally:
        torch.set_num_threads(before)
