"""The x4 upscaler in the continuous loop (worker/loop.py) against diffusers' own
StableDiffusionUpscalePipeline, on tiny-upscaler (a 7-channel UNet, a three-level VAE, DDIM, built
offline by worker/build.py), and upscaling jobs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_refused, max_diff, sdqueue_cli, sdqueue_worker
from tests.test_inpaint import png
from worker.loop import ContinuousLoop, drain
from worker.samples import ConditioningCache, Prompt, Sample

LOW = 64  # the input's side: the output is 256


@pytest.fixture(scope="module")
def upscaler(data_dir):  # type: ignore[no-untyped-def]
    """tiny-upscaler, as `sdqueue models build-tiny` built it into the session's data dir, on the CPU."""
    from models.registry import resolve_model
    from worker.pipeline import load_model

    return load_model(resolve_model("tiny-upscaler", data_dir), "cpu")


def small(seed: int = 0, size: tuple[int, int] = (LOW, LOW)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray((smooth * 0.7 + rng.integers(0, 70, smooth.shape)).astype("uint8"))


def samples(job_id: str, prompt: str, seed: int, count: int, guidance: float, image: Image.Image,
            noise_level: int) -> list[Sample]:
    return [Sample(job_id, i, seed + i, Prompt(prompt, "", False), guidance, image, noise_level=noise_level)
            for i in range(count)]


def diffusers_upscale(model, prompt, seed, steps, guidance, image, noise_level):  # type: ignore[no-untyped-def]
    return model.upscaler(prompt=prompt, image=image, num_inference_steps=steps, guidance_scale=guidance,
                          noise_level=noise_level, output_type="pil",
                          generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_upscaler_samples_in_one_loop_each_equal_diffusers_alone(upscaler):
    cache = ConditioningCache(upscaler)
    loop = ContinuousLoop(upscaler, 4 * LOW, 4 * LOW)
    a = samples("a", "a cat", 5, 2, 6.0, small(0), 20)
    b = samples("b", "a dog", 9, 1, 1.0, small(1), 150)  # unguided, its own noise level and steps
    loop.admit(a, cache.get([s.prompt for s in a]), steps=4)
    loop.step()  # b joins a loop already running
    loop.admit(b, cache.get([s.prompt for s in b]), steps=3)
    assert loop.active[0].extra.shape == (1, 3, LOW, LOW)
    images = {(s.job_id, s.sample.index): image for s, image in drain(loop)}
    assert images["a", 0].shape == (4 * LOW, 4 * LOW, 3)
    for index in (0, 1):
        assert max_diff(images["a", index], diffusers_upscale(upscaler, "a cat", 5 + index, 4, 6.0, small(0), 20)) <= 1
    assert max_diff(images["b", 0], diffusers_upscale(upscaler, "a dog", 9, 3, 1.0, small(1), 150)) <= 1


def test_a_window_batch_of_upscaler_samples_equals_diffusers_alone_and_other_models_refuse_them(upscaler, model):
    from worker.batch import generate_batch
    from worker.samples import compat_key

    key = compat_key({"width": 4 * LOW, "height": 4 * LOW, "num_inference_steps": 3, "noise_level": 40},
                     img2img=True)
    assert key.mode == "upscale"
    batch = samples("w", "a blue door", 20, 2, 5.0, small(4), 40)
    results = generate_batch(upscaler, key, batch, ConditioningCache(upscaler).get([s.prompt for s in batch]))
    for i, image in enumerate(results):
        assert max_diff(image, diffusers_upscale(upscaler, "a blue door", 20 + i, 3, 5.0, small(4), 40)) <= 1
    other = ContinuousLoop(model, 4 * LOW, 4 * LOW)  # tiny: no upscaler
    with pytest.raises(ValueError, match="does not upscale"):
        other.admit(batch, ConditioningCache(model).get([s.prompt for s in batch]), steps=3)


# ---------------------------------------------------------------- end to end


def test_upscaler_jobs_run_end_to_end_from_the_cli_the_api_and_a_manifest(settings, client, upscaler, tmp_path):
    import base64
    import json
    import subprocess
    import sys

    import httpx
    from sqlalchemy import select

    from models.tables import Job, Run
    from producer.cli import main
    from tests.test_api import serving
    from tests.test_end_to_end import pixels, s3_object

    image = png(small(2))
    (tmp_path / "small.png").write_bytes(image)
    common = {"num_inference_steps": 3, "model": "tiny-upscaler"}
    with sdqueue_worker("tiny-upscaler", tmp_path / "worker.log"):
        cli = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--prompt", "a red sofa", "--model",
                              "tiny-upscaler", "--image", str(tmp_path / "small.png"), "--noise-level", "30",
                              "--num-inference-steps", "3", "--seed", "11"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        ids = [cli.stdout.strip()]
        with serving(settings.model_copy(update={"api_auth": "off"})) as url:
            as_json = {"prompt": "a lamp", "seed": 12, "image": base64.b64encode(image).decode(), **common}
            answer = httpx.post(f"{url}/v1/jobs", json=as_json, timeout=30)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
            form = {name: str(value) for name, value in {"prompt": "a plant", "seed": 13, "noise_level": 0,
                                                          **common}.items()}
            answer = httpx.post(f"{url}/v1/jobs", data=form, files={"image": ("small.png", image, "image/png")},
                                timeout=30)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
            refused = httpx.post(f"{url}/v1/jobs", json={**as_json, "noise_level": 351}, timeout=30)
            assert refused.status_code == 422 and "less than or equal to 350" in refused.text
        manifest = tmp_path / "run.jsonl"
        manifest.write_text(json.dumps({"prompt": "a chair", "image": "small.png", "seed": 14, **common}) + "\n")
        assert main(["run", str(manifest), "--name", "upscale-run"]) == 0
        with client.db.session() as session:
            run_id = session.scalar(select(Run.id).where(Run.name == "upscale-run"))
            ids.append(session.scalar(select(Job.id).where(Job.run_id == run_id)))
        for job_id, level in zip(ids, (30, 20, 0, 20)):
            record = client.wait(job_id, timeout=240)
            assert record["state"] == "succeeded", (record, (tmp_path / "worker.log").read_text()[-3000:])
            assert record["mode"] == "upscale" and record["model"] == "tiny-upscaler"
            assert record["params"]["noise_level"] == level
            assert (record["params"]["width"], record["params"]["height"]) == (4 * LOW, 4 * LOW)
        # the CLI's job: the image diffusers' own pipeline makes of it alone, 4x its input
        first = client.get(ids[0])
        made = pixels(s3_object(settings, first["images"][0]["key"]))
        assert made.shape == (4 * LOW, 4 * LOW, 3)
        assert max_diff(made, diffusers_upscale(upscaler, "a red sofa", 11, 3, 7.5, small(2), 30)) <= 1
        # made again from its record alone: the same pixels
        again = sdqueue_cli("reproduce", ids[1], "--json", timeout=300)
        assert again.returncode == 0, (again.stdout, again.stderr)


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "tiny-upscaler", "--image", "LARGE"],
     ["image: 320x256 px = 81920 px is larger than the upscaler's input bound of 65536 px", "256x256"]),
    (["--model", "tiny-upscaler", "--image", "SMALL", "--noise-level", "400"], ["noise_level=400", "350"]),
    (["--model", "tiny-upscaler", "--image", "SMALL", "--width", "512"], ["width=512", "4x its input: 256 px"]),
    (["--model", "tiny-upscaler"], ["image required", "tiny-upscaler upscales"]),
    (["--model", "tiny", "--noise-level", "20"], ["noise_level is for upscaler models", "model tiny runs"]),
])
def test_bad_upscaler_input_is_refused_in_one_line_and_nothing_is_written(settings, trace, tmp_path, args, words):
    files = {"SMALL": small(3), "LARGE": small(3, (320, 256))}
    for name, image in files.items():
        (tmp_path / f"{name}.png").write_bytes(png(image))
    args = [str(tmp_path / f"{a}.png") if a in files else a for a in args]
    assert_refused(trace, ["--prompt", "a cat", *args], words)
