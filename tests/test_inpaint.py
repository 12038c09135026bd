"""Inpainting in the continuous loop (worker/loop.py) against diffusers' own
StableDiffusionInpaintPipeline, on tiny-inpainting (the tiny architecture with a 9-channel UNet,
built offline by worker/build.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import max_diff
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
