"""Depth-to-image in the continuous loop (worker/loop.py) against diffusers' own
StableDiffusionDepth2ImgPipeline, on tiny-depth (a 5-channel UNet and a tiny DPT depth estimator,
built offline by worker/build.py), and depth jobs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import max_diff
from tests.test_inpaint import png
from tests.test_loop import SIZE, picture
from worker.loop import ContinuousLoop, drain
from worker.samples import ConditioningCache, Prompt, Sample


@pytest.fixture(scope="module")
def depth(data_dir):  # type: ignore[no-untyped-def]
    """tiny-depth, as `sdqueue models build-tiny` built it into the session's data dir, on the CPU."""
    from models.registry import resolve_model
    from worker.pipeline import load_model

    return load_model(resolve_model("tiny-depth", data_dir), "cpu")


def depth_png(kind: str = "L") -> bytes:
    """A caller's depth map: a ramp, near at the bottom; 8-bit greyscale, or 16-bit at another size."""
    if kind == "L":
        return png(Image.fromarray(np.linspace(0, 255, SIZE)[:, None].repeat(SIZE, 1).astype("uint8")))
    ramp = np.linspace(0, 65535, 96)[:, None].repeat(160, 1) * np.linspace(0.5, 1, 160)[None, :]
    return png(Image.fromarray(ramp.astype("uint16")))


def as_tensor(data: bytes) -> torch.Tensor:
    """The map as a caller hands it to diffusers: its greyscale values, [1, H, W]."""
    import io

    with Image.open(io.BytesIO(data)) as img:
        values = np.asarray(img if img.mode.startswith("I") else img.convert("L"), dtype=np.float32)
    return torch.from_numpy(values)[None]


def samples(job_id: str, prompt: str, seed: int, count: int, guidance: float, image: Image.Image,
            depth_map: bytes | None = None, strength: float = 0.8) -> list[Sample]:
    from worker.inputs import prepare_depth_map

    prepared = prepare_depth_map(depth_map) if depth_map is not None else None
    return [Sample(job_id, i, seed + i, Prompt(prompt, "", False), guidance, image, strength=strength, depth=True,
                   depth_map=prepared) for i in range(count)]


def diffusers_depth(model, prompt, seed, steps, guidance, image, strength, depth_map=None):  # type: ignore[no-untyped-def]
    import warnings

    with warnings.catch_warnings():  # the pipeline runs its DPT under autocast: in float32 on the CPU torch warns
        warnings.filterwarnings("ignore", "In CPU autocast, but the target dtype is not supported", UserWarning)
        return model.depth(prompt=prompt, image=image, depth_map=None if depth_map is None else as_tensor(depth_map),
                           strength=strength, num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                           generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_depth_samples_in_one_loop_each_equal_diffusers_alone(depth):
    cache = ConditioningCache(depth)
    loop = ContinuousLoop(depth, SIZE, SIZE)
    a = samples("a", "a red sofa", 5, 2, 6.0, picture(0))  # the map estimated by the model's DPT
    b = samples("b", "a window", 9, 1, 1.0, picture(1), depth_png("L"), strength=1.0)  # unguided, the caller's map
    loop.admit(a, cache.get([s.prompt for s in a]), steps=4, strength=0.8)
    loop.admit(b, cache.get([s.prompt for s in b]), steps=4, strength=1.0)
    loop.step()  # c joins a loop already running, with its own steps, strength and 16-bit map of another size
    c = samples("c", "a lamp", 3, 1, 7.5, picture(2), depth_png("I;16"), strength=0.6)
    loop.admit(c, cache.get([s.prompt for s in c]), steps=6, strength=0.6)
    assert loop.active[0].extra.shape == (1, 1, SIZE // 8, SIZE // 8)
    images = {(s.job_id, s.sample.index): image for s, image in drain(loop)}
    for index in (0, 1):
        assert max_diff(images["a", index], diffusers_depth(depth, "a red sofa", 5 + index, 4, 6.0, picture(0), 0.8)) <= 1
    assert max_diff(images["b", 0], diffusers_depth(depth, "a window", 9, 4, 1.0, picture(1), 1.0, depth_png("L"))) <= 1
    assert max_diff(images["c", 0], diffusers_depth(depth, "a lamp", 3, 6, 7.5, picture(2), 0.6,
                                                    depth_png("I;16"))) <= 1
    # the estimate is the image's own: another image's makes another picture
    assert max_diff(images["a", 0], diffusers_depth(depth, "a red sofa", 5, 4, 6.0, picture(0), 0.8,
                                                    depth_png("L"))) > 1


def test_a_window_batch_of_depth_samples_equals_diffusers_alone_and_other_loops_refuse_them(depth, model):
    from worker.batch import generate_batch
    from worker.samples import compat_key

    key = compat_key({"width": SIZE, "height": SIZE, "num_inference_steps": 4, "strength": 0.7}, img2img=True,
                     depth=True)
    assert (key.mode, key.start_step) == ("depth", 2)
    batch = samples("w", "a blue door", 20, 2, 5.0, picture(4), strength=0.7)
    results = generate_batch(depth, key, batch, ConditioningCache(depth).get([s.prompt for s in batch]))
    for i, image in enumerate(results):
        assert max_diff(image, diffusers_depth(depth, "a blue door", 20 + i, 4, 5.0, picture(4), 0.7)) <= 1
    other = ContinuousLoop(model, SIZE, SIZE)  # tiny: a 4-channel UNet
    with pytest.raises(ValueError, match="no depth samples"):
        other.admit(batch, ConditioningCache(model).get([s.prompt for s in batch]), steps=4, strength=0.7)
    plain = [Sample("p", 0, 1, Prompt("a cat", "", False), 7.5, picture(0), strength=0.5)]
    with pytest.raises(ValueError, match="depth samples only"):
        ContinuousLoop(depth, SIZE, SIZE).admit(plain, ConditioningCache(depth).get([plain[0].prompt]), steps=3,
                                                strength=0.5)
