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


def test_a_job_that_cannot_run_is_failed_with_its_error(model, data_dir, tmp_path):
    from worker.engine import Engine
    from worker.tasks import WorkerContext, run_job

    settings = load_settings(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                             storage_url=(tmp_path / "objects").as_uri(), model="tiny")
    upgrade(settings.database_url)
    db, storage = Database(settings.database_url), open_storage(settings.storage_url)
    engine = Engine(model, db, storage, "test", pixel_budget=256 * 256, window=0)
    engine.serve(settings, send=lambda job_ids, queue: None)
    ctx = WorkerContext(settings, db, storage, engine)
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
    ctx.close()
