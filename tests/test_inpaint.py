"""Inpainting in the continuous loop (worker/loop.py) against diffusers' own
StableDiffusionInpaintPipeline, on tiny-inpainting (the tiny architecture with a 9-channel UNet,
built offline by worker/build.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_refused, max_diff, sdqueue_cli, sdqueue_worker
from tests.test_loop import SIZE, picture
from worker.loop import ContinuousLoop, drain
from worker.samples import ConditioningCache, Prompt, Sample


@pytest.fixture(scope="module")
def inpainting(data_dir):  # type: ignore[no-untyped-def]
    """tiny-inpainting, built once into the session's data dir and loaded on the CPU."""
    from models.registry import ModelSpec
    from worker.build import build_and_save
    from worker.pipeline import load_model

    folder = data_dir / "models" / "tiny-inpainting"
    if not (folder / "model_index.json").is_file():
        build_and_save("tiny-inpainting", folder)
    spec = ModelSpec("tiny-inpainting", None, 64, "v_prediction", local_dir=folder, modes=("inpaint",))
    return load_model(spec, "cpu")


def mask(kind: str = "box") -> Image.Image:
    """White repaints, black keeps: a box in the middle (L), or RGBA with a soft edge."""
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    pixels[SIZE // 4 : 3 * SIZE // 4, SIZE // 3 : 2 * SIZE // 3] = 255
    if kind == "box":
        return Image.fromarray(pixels, "L")
    rgba = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    rgba[:, : SIZE // 8, :3] = 100  # under the 50% threshold: kept
    return Image.fromarray(rgba, "RGBA")


def samples(job_id: str, prompt: str, seed: int, count: int, guidance: float, image: Image.Image,
            mask_image: Image.Image) -> list[Sample]:
    return [Sample(job_id, i, seed + i, Prompt(prompt, "", False), guidance, image, mask_image) for i in range(count)]


def diffusers_inpaint(model, prompt, seed, steps, guidance, image, mask_image, strength):  # type: ignore[no-untyped-def]
    return model.inpainting(prompt=prompt, image=image, mask_image=mask_image, strength=strength, width=SIZE,
                            height=SIZE, num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                            generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_inpainting_samples_in_one_loop_each_equal_diffusers_alone(inpainting):
    cache = ConditioningCache(inpainting)
    loop = ContinuousLoop(inpainting, SIZE, SIZE)
    a = samples("a", "a red sofa", 5, 2, 6.0, picture(0), mask("box"))
    b = samples("b", "a window", 9, 1, 1.0, picture(1), mask("soft"))  # unguided, an RGBA mask
    loop.admit(a, cache.get([s.prompt for s in a]), steps=4, strength=1.0)
    loop.step()  # b joins a loop already running, with a strength of its own
    loop.admit(b, cache.get([s.prompt for s in b]), steps=5, strength=0.6)
    assert loop.active[0].extra.shape == (1, 5, SIZE // 8, SIZE // 8)
    images = {(s.job_id, s.sample.index): image for s, image in drain(loop)}
    for index in (0, 1):
        expected = diffusers_inpaint(inpainting, "a red sofa", 5 + index, 4, 6.0, picture(0), mask("box"), 1.0)
        assert max_diff(images["a", index], expected) <= 1
    assert max_diff(images["b", 0], diffusers_inpaint(inpainting, "a window", 9, 5, 1.0, picture(1), mask("soft"),
                                                      0.6)) <= 1


def test_an_inpainting_loop_takes_only_inpainting_samples(inpainting, model):
    cache = ConditioningCache(inpainting)
    loop = ContinuousLoop(inpainting, SIZE, SIZE)
    plain = [Sample("p", 0, 1, Prompt("a cat", "", False), 7.5, picture(0))]
    with pytest.raises(ValueError, match="inpainting samples only"):
        loop.admit(plain, cache.get([s.prompt for s in plain]), steps=3, strength=0.5)
    other = ContinuousLoop(model, SIZE, SIZE)  # tiny: a 4-channel UNet
    masked = samples("m", "a cat", 1, 1, 7.5, picture(0), mask())
    with pytest.raises(ValueError, match="no inpainting samples"):
        other.admit(masked, ConditioningCache(model).get([s.prompt for s in masked]), steps=3, strength=0.5)


# ---------------------------------------------------------------- end to end


def png(image: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_inpainting_jobs_run_end_to_end_from_the_cli_the_api_and_a_manifest(settings, client, inpainting, tmp_path):
    import base64
    import hashlib
    import json
    import subprocess
    import sys

    import httpx

    from producer.cli import main
    from tests.test_api import serving
    from tests.test_end_to_end import pixels, s3_object

    image, box = png(picture(2)), png(mask("box"))
    (tmp_path / "room.png").write_bytes(image)
    (tmp_path / "mask.png").write_bytes(box)
    common = {"width": 256, "height": 256, "num_inference_steps": 3, "model": "tiny-inpainting"}
    with sdqueue_worker("tiny-inpainting", tmp_path / "worker.log"):
        cli = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--prompt", "a red sofa", "--model",
                              "tiny-inpainting", "--image", str(tmp_path / "room.png"), "--mask",
                              str(tmp_path / "mask.png"), "--width", "256", "--height", "256",
                              "--num-inference-steps", "3", "--seed", "11", "--strength", "1"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        ids = [cli.stdout.strip()]
        with serving(settings.model_copy(update={"api_auth": "off"})) as url:
            as_json = {"prompt": "a lamp", "seed": 12, "image": base64.b64encode(image).decode(),
                       "mask": base64.b64encode(box).decode(), **common}
            answer = httpx.post(f"{url}/v1/jobs", json=as_json, timeout=30)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
            form = {name: str(value) for name, value in {"prompt": "a plant", "seed": 13, **common}.items()}
            answer = httpx.post(f"{url}/v1/jobs", data=form, files={"image": ("room.png", image, "image/png"),
                                                                    "mask": ("mask.png", box, "image/png")}, timeout=30)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
            # a mask of another size, over HTTP: refused, naming both sizes
            small_mask = png(mask("box").resize((128, 128)))
            refused = httpx.post(f"{url}/v1/jobs", json={**as_json, "mask": base64.b64encode(small_mask).decode()},
                                 timeout=30)
            assert refused.status_code == 422 and "128x128 px, and the image is 256x256 px" in refused.text
        manifest = tmp_path / "run.jsonl"
        manifest.write_text(json.dumps({"prompt": "a chair", "image": "room.png", "mask": "mask.png", "seed": 14,
                                        **common}) + "\n")
        assert main(["run", str(manifest), "--name", "inpaint-run"]) == 0
        from sqlalchemy import select

        from models.tables import Job, Run

        with client.db.session() as session:
            run_id = session.scalar(select(Run.id).where(Run.name == "inpaint-run"))
            ids.append(session.scalar(select(Job.id).where(Job.run_id == run_id)))
        for job_id in ids:
            record = client.wait(job_id, timeout=240)
            assert record["state"] == "succeeded", (record, (tmp_path / "worker.log").read_text()[-3000:])
            assert record["mode"] == "inpaint" and record["model"] == "tiny-inpainting"
            assert record["mask_sha256"] == hashlib.sha256(box).hexdigest()
        # the CLI's job: the image diffusers' own pipeline makes of it alone
        first = client.get(ids[0])
        expected = diffusers_inpaint(inpainting, "a red sofa", 11, 3, 7.5, Image.open(tmp_path / "room.png"),
                                     Image.open(tmp_path / "mask.png"), 1.0)
        assert max_diff(pixels(s3_object(settings, first["images"][0]["key"])), expected) <= 1
        # made again from its record alone: the same pixels
        again = sdqueue_cli("reproduce", ids[1], "--json", timeout=300)
        assert again.returncode == 0, (again.stdout, again.stderr)


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "tiny-inpainting", "--image", "IMAGE"], ["mask required", "tiny-inpainting inpaints"]),
    (["--model", "tiny-inpainting", "--image", "IMAGE", "--mask", "SMALL"],
     ["mask: 128x128 px, and the image is 256x256 px", "same size"]),
    (["--model", "tiny", "--image", "IMAGE", "--mask", "MASK"], ["mask is for inpainting models", "model tiny runs"]),
])
def test_bad_inpainting_input_is_refused_in_one_line_and_nothing_is_written(settings, trace, tmp_path, args, words):
    files = {"IMAGE": picture(3), "MASK": mask(), "SMALL": mask().resize((128, 128))}
    for name, image in files.items():
        (tmp_path / f"{name}.png").write_bytes(png(image))
    args = [str(tmp_path / f"{a}.png") if a in files else a for a in args]
    assert_refused(trace, ["--prompt", "a cat", "--width", "256", "--height", "256", *args], words)


def test_a_window_batch_of_inpainting_samples_equals_diffusers_alone(inpainting):
    from worker.batch import generate_batch
    from worker.samples import compat_key

    key = compat_key({"width": SIZE, "height": SIZE, "num_inference_steps": 4, "strength": 0.7}, img2img=True,
                     inpaint=True)
    assert (key.mode, key.start_step) == ("inpaint", 2)
    batch = [Sample("w", i, 20 + i, Prompt("a blue door", "", False), 5.0, picture(4), mask(), 0.7) for i in range(2)]
    results = generate_batch(inpainting, key, batch, ConditioningCache(inpainting).get([s.prompt for s in batch]))
    for i, image in enumerate(results):
        expected = diffusers_inpaint(inpainting, "a blue door", 20 + i, 4, 5.0, picture(4), mask(), 0.7)
        assert max_diff(image, expected) <= 1
