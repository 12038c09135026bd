"""Step-level continuous batching: a sample's image does not depend on when it joined, who it ran
beside, or who left; diffusers' pipelines are the reference for a sample alone."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import max_diff
from worker.batch import generate_batch
from worker.samples import CompatKey, Prompt, Sample, start_step
from worker.loop import ContinuousLoop, drain

SIZE = 256


def job(job_id, prompt, seed, count=1, guidance=7.5, negative="", image=None):  # type: ignore[no-untyped-def]
    return [Sample(job_id, i, seed + i, Prompt(prompt, negative, False), guidance, image) for i in range(count)]


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, SIZE * SIZE * 3).reshape(SIZE, SIZE, 3)
    return Image.fromarray((smooth * 0.7 + rng.integers(0, 70, smooth.shape)).astype("uint8"))


def admit(loop, cache, samples, steps, strength=None):  # type: ignore[no-untyped-def]
    return loop.admit(samples, cache.get([s.prompt for s in samples]), steps=steps, strength=strength)


def alone(model, cache, samples, steps, strength=None):  # type: ignore[no-untyped-def]
    """The samples' images from generate_batch, the loop-free reference."""
    if strength is None:
        key = CompatKey("txt2img", SIZE, SIZE, steps)
    else:
        key = CompatKey("img2img", SIZE, SIZE, steps, start_step(steps, strength))
    return generate_batch(model, key, samples, cache.get([s.prompt for s in samples]))


def images_by_sample(finished: list[tuple[Any, Any]]) -> dict[tuple[str, int], np.ndarray]:
    return {(s.job_id, s.sample.index): image for s, image in finished}


@contextmanager
def scheduler(model, name: str, **config: Any) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Both pipelines on another scheduler (or another config) for the duration."""
    import diffusers

    saved = model.txt2img.scheduler, model.img2img.scheduler
    swapped = getattr(diffusers, name).from_config(saved[0].config, **config)
    model.txt2img.scheduler = model.img2img.scheduler = swapped
    try:
        yield
    finally:
        model.txt2img.scheduler, model.img2img.scheduler = saved


def diffusers_txt2img(model, prompt, seed, steps, guidance, negative=""):  # type: ignore[no-untyped-def]
    return model.txt2img(prompt=prompt, negative_prompt=negative, width=SIZE, height=SIZE, num_inference_steps=steps,
                         guidance_scale=guidance, output_type="pil",
                         generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def diffusers_img2img(model, prompt, seed, steps, guidance, image, strength):  # type: ignore[no-untyped-def]
    return model.img2img(prompt=prompt, image=image, strength=strength, num_inference_steps=steps,
                         guidance_scale=guidance, output_type="pil",
                         generator=torch.Generator("cpu").manual_seed(seed)).images[0]


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_a_txt2img_sample_alone_equals_diffusers(model, cache, guidance):
    loop = ContinuousLoop(model, SIZE, SIZE)
    assert loop.vectorised
    admit(loop, cache, job("a", "a red fox", 3, guidance=guidance, negative="blurry"), steps=4)
    [(sample, image)] = drain(loop)
    assert sample.calls == 4 and len(loop) == 0
    assert max_diff(image, diffusers_txt2img(model, "a red fox", 3, 4, guidance, negative="blurry")) <= 1


def test_an_img2img_sample_alone_equals_diffusers(model, cache):
    loop = ContinuousLoop(model, SIZE, SIZE)
    admit(loop, cache, job("b", "a harbour", 8, guidance=5.0, image=picture()), steps=5, strength=0.6)
    [(sample, image)] = drain(loop)
    assert sample.calls == 3  # steps 2..4 of 5, as diffusers' get_timesteps makes them
    assert max_diff(image, diffusers_img2img(model, "a harbour", 8, 5, 5.0, picture(), 0.6)) <= 1


def test_euler_with_epsilon_prediction_equals_diffusers(model, cache):
    with scheduler(model, "EulerDiscreteScheduler", prediction_type="epsilon"):
        loop = ContinuousLoop(model, SIZE, SIZE)
        assert loop.vectorised
        admit(loop, cache, job("a", "a lighthouse", 11, guidance=4.0), steps=3)
        admit(loop, cache, job("b", "a tree", 2, guidance=3.0, image=picture(1)), steps=4, strength=0.7)
        images = images_by_sample(drain(loop))
        assert max_diff(images["a", 0], diffusers_txt2img(model, "a lighthouse", 11, 3, 4.0)) <= 1
        assert max_diff(images["b", 0], diffusers_img2img(model, "a tree", 2, 4, 3.0, picture(1), 0.7)) <= 1


def test_samples_join_a_running_loop_and_finish_at_their_own_steps(model, cache):
    a = job("a", "a red fox", 3, guidance=7.0)  # txt2img, 6 steps
    b = job("b", "a harbour", 8, guidance=1.0, image=picture())  # img2img, 8 steps from 4: 4 calls
    c = job("c", "a lighthouse", 21, count=2, guidance=1.0)  # txt2img, 3 steps, joins after step 2
    d = job("d", "a tree", 5, guidance=5.0, negative="text", image=picture(1))  # img2img 5 from 1, joins after 3
    loop = ContinuousLoop(model, SIZE, SIZE)
    admit(loop, cache, a, steps=6)
    admit(loop, cache, b, steps=8, strength=0.5)
    finished_at: dict[tuple[str, int], int] = {}
    images: dict[tuple[str, int], np.ndarray] = {}
    step = 0
    while len(loop):
        if step == 2:
            admit(loop, cache, c, steps=3)
        if step == 3:
            admit(loop, cache, d, steps=5, strength=0.8)
        finished = loop.step()
        step += 1
        for s, image in zip(finished, loop.decode(finished)):
            finished_at[s.job_id, s.sample.index] = step
            images[s.job_id, s.sample.index] = image
    assert finished_at == {("a", 0): 6, ("b", 0): 4, ("c", 0): 5, ("c", 1): 5, ("d", 0): 7}
    assert max_diff(images["a", 0], alone(model, cache, a, 6)[0]) <= 1
    assert max_diff(images["b", 0], alone(model, cache, b, 8, 0.5)[0]) <= 1
    c_alone = alone(model, cache, c, 3)
    assert max_diff(images["c", 0], c_alone[0]) <= 1 and max_diff(images["c", 1], c_alone[1]) <= 1
    assert max_diff(images["d", 0], alone(model, cache, d, 5, 0.8)[0]) <= 1
    assert max_diff(images["c", 0], images["c", 1]) > 10  # seed + i: really different images


def test_dropping_a_job_leaves_the_others_unchanged(model, cache):
    a = job("a", "a red fox", 3, count=2, guidance=7.0)
    b = job("b", "a harbour", 8, guidance=1.0)
    c = job("c", "a tree", 5, guidance=4.0, image=picture(1))
    loop = ContinuousLoop(model, SIZE, SIZE)
    admit(loop, cache, a, steps=5)
    admit(loop, cache, b, steps=4)
    admit(loop, cache, c, steps=6, strength=0.9)
    loop.step()
    loop.step()
    dropped = loop.drop(["a", "nobody"])
    assert [(s.job_id, s.sample.index) for s in dropped] == [("a", 0), ("a", 1)]
    assert [s.job_id for s in loop.active] == ["b", "c"]
    images = images_by_sample(drain(loop))
    assert set(images) == {("b", 0), ("c", 0)}
    assert max_diff(images["b", 0], alone(model, cache, b, 4)[0]) <= 1
    assert max_diff(images["c", 0], alone(model, cache, c, 6, 0.9)[0]) <= 1


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"])
def test_other_schedulers_run_a_scheduler_per_sample(model, cache, name):
    with scheduler(model, name):
        loop = ContinuousLoop(model, SIZE, SIZE)
        assert not loop.vectorised
        admit(loop, cache, job("a", "a red fox", 3, guidance=6.0, negative="blurry"), steps=5)
        loop.step()
        loop.step()
        b = job("b", "a harbour", 8, guidance=1.0)
        admit(loop, cache, b, steps=4)
        loop.step()
        admit(loop, cache, job("c", "a tree", 2, guidance=3.0, image=picture(1)), steps=6, strength=0.5)
        images = images_by_sample(drain(loop))
        assert max_diff(images["a", 0], diffusers_txt2img(model, "a red fox", 3, 5, 6.0, negative="blurry")) <= 1
        assert max_diff(images["b", 0], alone(model, cache, b, 4)[0]) <= 1
        assert max_diff(images["c", 0], diffusers_img2img(model, "a tree", 2, 6, 3.0, picture(1), 0.5)) <= 1


def test_one_unet_call_per_step_over_every_row(model, cache):
    rows: list[int] = []
    timesteps: list[list[float]] = []

    def counting(sample, t, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(sample.shape[0])
        timesteps.append(t.tolist())
        return model.txt2img.unet(sample, t, *args, **kwargs)

    loop = ContinuousLoop(model, SIZE, SIZE, unet_call=counting)
    admit(loop, cache, job("a", "a red fox", 3, guidance=6.0), steps=3)  # 2 rows
    admit(loop, cache, job("b", "a harbour", 8, guidance=1.0), steps=2)  # 1 row
    loop.step()
    admit(loop, cache, job("c", "a tree", 2, count=2, guidance=3.0), steps=2)  # 2 x 2 rows
    steps = 1
    while len(loop):
        loop.step()
        steps += 1
    assert steps == 3 and rows == [3, 7, 6]  # a: 2 + b: 1; + c: 4; b has finished
    # rows: the unconditional a, c0, c1, then the conditional a, b, c0, c1. A guided sample's two
    # rows share its own timestep; rows of different schedules differ.
    t = timesteps[1]
    assert t[0] == t[3] and t[1] == t[2] == t[5] == t[6] and len({t[3], t[4], t[5]}) == 3


def test_admit_checks_its_inputs(model, cache):
    loop = ContinuousLoop(model, SIZE, SIZE)
    with pytest.raises(ValueError, match="input image"):
        admit(loop, cache, job("a", "a cat", 1), steps=3, strength=0.5)
    with pytest.raises(ValueError, match="runs no step"):
        admit(loop, cache, job("a", "a cat", 1, image=picture()), steps=3, strength=0.1)
    long_prompt = Prompt(" ".join(["a very detailed painting of a quiet harbour at dawn"] * 12), "", True)
    admit(loop, cache, job("a", "a cat", 1), steps=2)
    with pytest.raises(ValueError, match="one length"):
        loop.admit([Sample("b", 0, 1, long_prompt, 7.0)], cache.get([long_prompt]), steps=2)
    assert len(loop) == 1
