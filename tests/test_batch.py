"""The batch generation function: diffusers is the reference, and batch mates do not matter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import max_diff
from worker.batch import generate_batch
from worker.samples import CompatKey, ConditioningCache, Prompt, Sample, compat_key, start_step


def run(model, cache, key, samples):  # type: ignore[no-untyped-def]
    return generate_batch(model, key, samples, cache.get([s.prompt for s in samples]))


def job(job_id, prompt, seed, count=1, guidance=7.5, negative="", compel=False, image=None):  # type: ignore[no-untyped-def]
    return [Sample(job_id, i, seed + i, Prompt(prompt, negative, compel), guidance, image) for i in range(count)]


def picture(width: int = 320, height: int = 256) -> Image.Image:
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray((smooth * 0.7 + rng.integers(0, 70, smooth.shape)).astype("uint8")).resize((256, 256))


@pytest.mark.parametrize("guidance", [6.0, 1.0])  # at 1.0 both run the conditional row only
def test_txt2img_equals_diffusers(model, cache, guidance):
    import torch

    key = CompatKey("txt2img", 320, 256, 4)
    ours = run(model, cache, key, job("a", "a red fox", 3, count=2, guidance=guidance, negative="blurry"))
    reference = model.txt2img(
        prompt="a red fox", negative_prompt="blurry", num_images_per_prompt=2, width=320, height=256,
        num_inference_steps=4, guidance_scale=guidance, output_type="pil",
        generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)],
    ).images
    for mine, theirs in zip(ours, reference):
        assert max_diff(mine, theirs) <= 1


def test_guidance_one_runs_only_its_conditional_row_beside_guided_mates(model, cache):
    import torch

    key = CompatKey("txt2img", 256, 256, 3)
    samples = job("a", "a red fox", 3, guidance=1.0) + job("b", "a lighthouse", 5, guidance=6.0)
    rows: list[int] = []

    def counting(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(sample.shape[0])
        return model.txt2img.unet(sample, *args, **kwargs)

    ours = generate_batch(model, key, samples, cache.get([s.prompt for s in samples]), unet_call=counting)
    assert rows == [3, 3, 3]  # per step: the guided sample's two rows, the unguided one's one
    reference = model.txt2img(prompt="a red fox", width=256, height=256, num_inference_steps=3, guidance_scale=1.0,
                              output_type="pil", generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert max_diff(ours[0], reference) <= 1
    assert max_diff(ours[1], run(model, cache, key, job("b", "a lighthouse", 5, guidance=6.0))[0]) <= 1


def test_img2img_equals_diffusers(model, cache):
    import torch

    image = picture()
    key = compat_key({"width": 256, "height": 256, "num_inference_steps": 5, "strength": 0.6}, img2img=True)
    assert key.start_step == start_step(5, 0.6) == 2
    ours = run(model, cache, key, job("b", "a harbour", 8, count=2, guidance=5.0, image=image))
    reference = model.img2img(
        prompt="a harbour", image=image, strength=0.6, num_images_per_prompt=2, num_inference_steps=5,
        guidance_scale=5.0, output_type="pil", generator=[torch.Generator("cpu").manual_seed(s) for s in (8, 9)],
    ).images
    for mine, theirs in zip(ours, reference):
        assert max_diff(mine, theirs) <= 1


def test_a_job_does_not_depend_on_its_batch_mates(model, cache):
    key = CompatKey("txt2img", 256, 256, 3)
    alone = run(model, cache, key, job("a", "a lighthouse", 21, count=2, guidance=7.0))
    mates = (
        job("b", "a (red)++ cat", 5, guidance=12.0, compel=True)
        + job("a", "a lighthouse", 21, count=2, guidance=7.0)
        + job("c", '("a cat", "a dog").blend(0.5, 0.5)', 99, count=3, guidance=3.5, negative="text", compel=True)
        + job("d", "a lighthouse", 0, guidance=1.0)
    )
    together = run(model, cache, key, mates)
    assert max_diff(together[1], alone[0]) <= 1 and max_diff(together[2], alone[1]) <= 1
    assert max_diff(together[0], together[1]) > 10  # mates really are different images
    # replaying the same batch gives the same pixels exactly
    again = run(model, cache, key, mates)
    assert all(np.array_equal(x, y) for x, y in zip(together, again))


def test_img2img_batch_mixes_input_images(model, cache):
    other = Image.new("RGB", (256, 256), (10, 200, 30))
    key = CompatKey("img2img", 256, 256, 4, start_step=1)
    alone = run(model, cache, key, job("a", "a tree", 4, image=picture()))
    together = run(model, cache, key, job("b", "a field", 1, guidance=9.0, image=other) + job("a", "a tree", 4, image=picture()))
    assert max_diff(together[1], alone[0]) <= 1


def test_long_compel_prompts_have_longer_conditioning(model, cache):
    long_prompt = " ".join(["a very detailed painting of a quiet harbour at dawn"] * 12)
    short, long = cache.get([Prompt("a cat", "", True), Prompt(long_prompt, "", True)])
    assert short.tokens == 77 and long.tokens > 77
    with pytest.raises(ValueError, match="conditioning of one length"):
        generate_batch(model, CompatKey("txt2img", 256, 256, 1), job("a", "a cat", 1, compel=True)
                       + job("b", long_prompt, 2, compel=True), [short, long])
    image = run(model, cache, CompatKey("txt2img", 256, 256, 2), job("b", long_prompt, 2, compel=True))[0]
    assert image.shape == (256, 256, 3)


def test_conditioning_is_computed_once_per_prompt(model):
    calls = []
    cache = ConditioningCache(model)
    original = model.txt2img.text_encoder.forward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape[0] if args else kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.txt2img.text_encoder.forward = counting
    try:
        prompts = [Prompt("a cat", "", False)] * 5 + [Prompt("a dog", "", False)]
        cache.get(prompts)
        cache.get(prompts)
    finally:
        del model.txt2img.text_encoder.forward
    assert calls == [4]  # one encoder call: 2 distinct prompts + their 2 negatives


def test_image_i_is_made_from_seed_plus_i(model, cache):
    key = CompatKey("txt2img", 256, 256, 3)
    three = run(model, cache, key, job("a", "a cat", 10, count=3))
    alone = run(model, cache, key, job("b", "a cat", 12))
    assert max_diff(three[2], alone[0]) <= 1
    assert max_diff(three[0], three[2]) > 10
