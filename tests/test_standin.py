"""The stand-in GPU (SDQUEUE_MODEL=standin): its modelled time, its images, and a real `sdqueue
worker` process serving jobs with it, without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.registry import resolve_model
from tests.servers import stop_process_group
from worker.backend import open_model
from worker.batcher import PixelBudget, Work
from worker.encode import read_record
from worker.loops import Loops
from worker.samples import ConditioningCache, compat_key, job_samples
from worker.standin import StandinModel, Timing, pattern

TIMEOUT = 240
ROOT = Path(__file__).resolve().parent.parent


def test_the_default_timing_is_an_h100_at_about_4_5_images_per_second() -> None:
    timing = Timing()
    # 8 guided images of 768x768 a loop (16 rows), 25 steps, then their decode
    per_loop = 25 * timing.unet_seconds(16, 768, 768) + timing.decode_seconds(8, 768, 768)
    assert 4.3 < 8 / per_loop < 4.7
    # one image a loop is bound by launches: about 2 images/s, as the compiled UNet measured
    assert 1.8 < 1 / (25 * timing.unet_seconds(2, 768, 768) + timing.decode_seconds(1, 768, 768)) < 2.1
    assert timing.unet_seconds(16, 512, 512) < timing.unet_seconds(16, 768, 768)
    assert Timing(scale=0).unet_seconds(16, 768, 768) == Timing(scale=0).decode_seconds(8, 768, 768) == 0
    assert Timing(scale=2).unet_seconds(4, 512, 512) == pytest.approx(2 * timing.unet_seconds(4, 512, 512))


def test_its_images_are_the_seeds_pattern_of_the_requested_size() -> None:
    a, b = pattern(7, 96, 64), pattern(8, 96, 64)
    assert a.shape == (64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pattern(7, 96, 64)) and not np.array_equal(a, b)


def test_its_loops_run_through_the_engines_admission(tmp_path: Path) -> None:
    """Jobs of two sizes and step counts through worker/loops.py's Loops, as the engine drives it;
    each job's images are its seeds' patterns, and a job's calls count its own steps."""
    model = StandinModel(resolve_model("standin", tmp_path), scale=0)
    counted: list[int] = []

    def counting(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted.append(sample.shape[0])
        return model.unet(sample, *args, **kwargs)

    loops = Loops(model, PixelBudget(4 * 256 * 256), counting)
    cache = ConditioningCache(model)
    params = {"prompt": "p", "negative_prompt": "", "use_compel": False, "guidance_scale": 7.5, "num_images": 2}
    jobs = {"a": {**params, "width": 256, "height": 256, "num_inference_steps": 3},
            "b": {**params, "width": 128, "height": 192, "num_inference_steps": 5, "guidance_scale": 1.0}}
    for job_id, job in jobs.items():
        work = Work(job_id, compat_key(job, False), job_samples(job_id, job, 40, None), created_at=0.0, params=job)
        work.conditioning = cache.get([s.prompt for s in work.samples])
        work.tokens = work.conditioning[0].tokens
        assert loops.admit(work) is None
    done = {}
    while len(loops):
        finished, again = loops.step()
        assert again == []
        done.update({member.work.job_id: (images, stats) for member, images, stats in finished})
    for job_id, job in jobs.items():
        images, stats = done[job_id]
        assert [i.shape for i in images] == [(job["height"], job["width"], 3)] * 2
        assert np.array_equal(images[1], pattern(41, job["width"], job["height"]))
        assert [s[0] for s in stats] == [job["num_inference_steps"]] * 2
    assert sorted(counted) == sorted([4] * 3 + [2] * 5)  # guided: two rows a sample


def test_a_worker_on_the_standin_imports_no_torch(tmp_path: Path) -> None:
    code = ("import sys; from models.settings import load_settings; from worker.backend import open_model; "
            "import worker.main, worker.tasks, worker.engine; m = open_model(load_settings()); "
            "print(m.spec.name, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    env = {**os.environ, "SDQUEUE_MODEL": "standin", "SDQUEUE_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=TIMEOUT, check=True).stdout
    assert out.split() == ["standin", "False", "False"]


def sdqueue(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def test_sdqueue_worker_serves_jobs_on_the_standin(settings_env, tmp_path, png_bytes):  # type: ignore[no-untyped-def]
    """txt2img and img2img through Redis, a `sdqueue worker --model standin` process, S3 and
    PostgreSQL: real PNGs, records that name the stand-in, and no torch in the worker."""
    env = {**os.environ, "SDQUEUE_STANDIN_SCALE": "0"}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--model", "standin"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    (tmp_path / "in.png").write_bytes(png_bytes(384, 256))
    try:
        ids = []
        for args in (["--num-images", "2", "--seed", "100", "--width", "320", "--height", "256"],
                     ["--image", str(tmp_path / "in.png"), "--strength", "0.5", "--width", "384", "--height", "256"]):
            result = sdqueue("submit", "--prompt", "a small boat", "--model", "standin", "--num-inference-steps", "4",
                             *args, env=env)
            assert result.returncode == 0, result.stderr
            ids.append(result.stdout.strip())
        for job_id in ids:
            waited = sdqueue("wait", job_id, "--timeout", str(TIMEOUT), "--json", env=env)
            assert waited.returncode == 0, (waited.stdout, (tmp_path / "worker.log").read_text()[-3000:])
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "libtorch" not in maps  # the worker process never loaded torch
        fetched = sdqueue("fetch", ids[0], str(tmp_path / "out"), env=env)
        assert fetched.returncode == 0, fetched.stderr
        pngs = sorted((tmp_path / "out").glob("*.png"))
        assert len(pngs) == 2
        image = Image.open(pngs[0])
        assert image.size == (320, 256)
        assert np.array_equal(np.asarray(image.convert("RGB")), pattern(100, 320, 256))
        record = read_record(pngs[0].read_bytes())
        assert (record["model"], record["device"], record["scheduler"]) == ("standin", "standin", "standin")
        status = json.loads(sdqueue("status", ids[1], "--json", env=env).stdout)
        assert status["state"] == "succeeded" and len(status["images"]) == 1
    finally:
        stop_process_group(worker, timeout=60)
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "model standin from standin" in text


def test_open_model_gives_the_standin_its_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import load_settings

    monkeypatch.setenv("SDQUEUE_MODEL", "standin")
    monkeypatch.setenv("SDQUEUE_STANDIN_SCALE", "0.5")
    monkeypatch.setenv("SDQUEUE_DATA_DIR", str(tmp_path))
    model = open_model(load_settings())
    assert isinstance(model, StandinModel) and model.timing.scale == 0.5
    assert model.peak_memory() is None and model.compile(load_settings(), 1) is None
