"""Continuous batching in the worker: jobs join running loops at step boundaries, the loop that
steps next keeps every size moving, out of memory sheds jobs that start again, and an image does
not depend on who it shared its calls with."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import counting_unet_calls, max_diff, small, wait_for
from tests.test_end_to_end import pixels, s3_object
from tests.test_loop import picture
from worker.batch import generate_batch
from worker.samples import CompatKey, Prompt, Sample, compat_key, job_samples
from worker.batcher import Batcher, PixelBudget, Work
from worker.loop import ContinuousLoop, drain, run_direct
from worker.loops import Loops

TIMEOUT = 180


def params(steps: int, guidance: float = 7.0, count: int = 1, size: int = 256, strength: float | None = None,
           prompt: str = "a red fox") -> dict[str, Any]:
    return {"prompt": prompt, "negative_prompt": "", "use_compel": False, "width": size, "height": size,
            "num_inference_steps": steps, "guidance_scale": guidance, "num_images": count, "strength": strength}


def alone(model, cache, job: dict[str, Any]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    image = job.get("init_image")
    samples = job_samples(job["job_id"], job["params"], job["seed"], image)
    key = compat_key(job["params"], image is not None)
    if key.mode == "img2img" and key.start_step >= key.steps:
        return [np.asarray(image.convert("RGB"))] * len(samples)
    return generate_batch(model, key, samples, cache.get([s.prompt for s in samples]))


def test_jobs_that_join_running_loops_get_the_images_they_get_alone(model, cache):
    jobs = [
        {"job_id": "a", "params": params(8, 7.0, count=2), "seed": 1},
        {"job_id": "b", "params": params(3, 1.0, prompt="a harbour"), "seed": 2, "arrive_at": 0.05},
        {"job_id": "c", "params": params(5, 4.0, size=320, prompt="a tree"), "seed": 3, "arrive_at": 0.1},
        {"job_id": "d", "params": params(6, 5.0, count=2, strength=0.5, prompt="a lake"), "seed": 4, "init_image": picture(1),
         "arrive_at": 0.15},
        {"job_id": "e", "params": params(4, 1.0, strength=0.0), "seed": 5, "init_image": picture(2), "arrive_at": 0.2},
        {"job_id": "f", "params": params(2, 12.0, count=3, prompt="a boat"), "seed": 6, "arrive_at": 0.3},
    ]
    images = run_direct(model, jobs, pixel_budget=6 * 256 * 256)
    for job in jobs:
        reference = alone(model, cache, job)
        assert len(images[job["job_id"]]) == job["params"]["num_images"]
        for mine, theirs in zip(images[job["job_id"]], reference):
            assert max_diff(mine, theirs) <= 1, job["job_id"]


def work(job_id: str, steps: int, size: int, created: float, cache, bulk: bool = False) -> Work:  # type: ignore[no-untyped-def]
    p = params(steps, 5.0, size=size)
    w = Work(job_id, compat_key(p, False), job_samples(job_id, p, 7, None), created_at=created, params=p,
             priority="bulk" if bulk else "interactive")
    w.conditioning = cache.get([s.prompt for s in w.samples])
    w.tokens = w.conditioning[0].tokens
    return w


def test_the_loop_holding_the_oldest_job_steps_so_no_size_starves(model, cache):
    widths: list[int] = []

    def counting(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        widths.append(sample.shape[-1] * 8)
        return model.txt2img.unet(sample, *args, **kwargs)

    loops = Loops(model, PixelBudget(8 * 256 * 256), counting)
    loops.admit(work("a", 4, 256, 1.0, cache))
    loops.admit(work("b", 2, 320, 2.0, cache))
    finished_order = []
    for step in range(20):
        if step == 1:
            loops.admit(work("c", 5, 256, 3.0, cache))  # joins a's loop, but is newer than b
        finished, again = loops.step()
        assert again == []
        finished_order += [member.work.job_id for member, _, _ in finished]
        if not len(loops):
            break
    # a's loop (with c from its second step) runs until a is done; then b, older than c, goes
    assert widths == [256] * 4 + [320] * 2 + [256] * 2
    assert finished_order == ["a", "b", "c"]


def test_bulk_loops_get_every_bulk_share_th_step_under_interactive_work(model, cache):
    loops = Loops(model, PixelBudget(8 * 256 * 256), bulk_share=3)
    loops.admit(work("bulk", 6, 320, 0.5, cache, bulk=True))
    loops.admit(work("interactive", 30, 256, 9.0, cache))
    picked = [loops.next_group()[0] for _ in range(9)]
    assert picked == [256, 256, 320] * 3


def test_out_of_memory_sheds_the_newest_jobs_which_start_again_with_the_same_images(model, cache):
    jobs = [{"job_id": f"j{i}", "params": params(3 + i % 2, 5.0 + i, prompt=f"prompt {i % 3}"), "seed": 40 + i,
             "arrive_at": 0.0} for i in range(5)]
    rows: list[int] = []

    def small_gpu(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(sample.shape[0])
        if sample.shape[0] > 4:  # more than 2 guided samples do not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return model.txt2img.unet(sample, *args, **kwargs)

    images = run_direct(model, jobs, pixel_budget=8 * 256 * 256, unet_call=small_gpu)
    # each failed call shrinks the budget by a sample and puts the newest job out: 5, 4, 3 samples
    # failed, then 2 fit, and from then on the loop never holds more than fit
    assert rows[:4] == [10, 8, 6, 4] and max(rows[3:]) <= 4
    for job in jobs:
        assert max_diff(images[job["job_id"]][0], alone(model, cache, job)[0]) <= 1


def test_out_of_memory_in_the_decode_decodes_one_at_a_time_and_keeps_the_denoising(model, cache):
    vae = model.txt2img.vae
    decode = vae.decode
    decoded: list[int] = []
    calls: list[int] = []

    def small_gpu(latents, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")
        return decode(latents, *args, **kwargs)

    def counting(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(sample.shape[0])
        return model.txt2img.unet(sample, *args, **kwargs)

    samples = [Sample("a", i, 9 + i, Prompt("a red fox", "", False), 5.0) for i in range(3)]
    loop = ContinuousLoop(model, 256, 256, unet_call=counting)
    loop.admit(samples, cache.get([s.prompt for s in samples]), steps=3)
    vae.decode = small_gpu
    try:
        images = [image for _, image in drain(loop)]
    finally:
        vae.decode = decode
    assert decoded == [3, 1, 1, 1] and calls == [6, 6, 6]  # denoised once
    reference = generate_batch(model, CompatKey("txt2img", 256, 256, 3), samples, cache.get([s.prompt for s in samples]))
    assert max(max_diff(a, b) for a, b in zip(images, reference)) <= 1


def test_admission_fits_loops_in_priority_order_and_nobody_overtakes_in_a_loop():
    def w(job_id: str, size: int, images: int, created: float, bulk: bool = False) -> Work:
        samples = [Sample(job_id, i, i, Prompt("p", "", False), 5.0) for i in range(images)]
        item = Work(job_id, CompatKey("txt2img", size, size, 3), samples, created, "bulk" if bulk else "interactive")
        item.tokens = 77
        return item

    batcher = Batcher(PixelBudget(4 * 256 * 256), window=10.0)
    for item in [w("bulk-old", 256, 1, 1.0, bulk=True), w("big", 256, 3, 2.0), w("small", 256, 1, 3.0),
                 w("other", 320, 9, 4.0), w("later", 320, 1, 5.0)]:
        batcher.put(item)
    used = {256: 2 * 256 * 256, 320: 0}  # a loop of 256x256 holds 2 images; none of 320x320 runs

    def room(item: Work) -> tuple[int, int]:
        return used[item.key.width], 4 * 256 * 256

    admitted = [item.job_id for item in batcher.admit(room)]
    # no window: admitted at once. "big" (3 images) does not fit beside the 2 running, and
    # "small" and the bulk job may not overtake it; an empty 320 loop takes "other" alone though
    # it is over the budget, and then "later" does not fit.
    assert admitted == ["other"]
    used.update({256: 0, 320: 9 * 256 * 256})  # the 256x256 loop ended
    assert [item.job_id for item in batcher.admit(room)] == ["big", "small"]
    used.update({256: 0, 320: 0})
    assert [item.job_id for item in batcher.admit(room)] == ["later", "bulk-old"]
    assert batcher.admit(room, wait=0.05) == [] and len(batcher) == 0


@pytest.fixture
def unet_calls(worker):  # type: ignore[no-untyped-def]
    from worker.tasks import generate

    with counting_unet_calls(generate.context.engine) as calls:
        yield calls


def test_a_job_joins_a_running_loop_at_the_next_step(settings, client, worker, unet_calls):
    long_id = client.submit(small(prompt="a long river", num_inference_steps=60, seed=3))  # 2 rows a call
    wait_for(lambda: len(unet_calls) >= 3)
    short = small(prompt="a short walk", num_inference_steps=3, guidance_scale=1.0, seed=8)  # 1 row a call
    short_id = client.submit(short)
    record = client.wait(short_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded"
    assert client.get(long_id)["state"] == "running"  # it did not wait for the long job's loop to end
    joined = unet_calls.index(3)
    assert unet_calls[joined : joined + 3] == [3, 3, 3] and unet_calls[joined + 3] == 2
    [image] = record["images"]
    assert (image["steps_run"], image["shared_max"], image["shared_mean"]) == (3, 2, 2.0)
    assert image["batch_id"] and image["batch_size"] is None and image["batch_position"] is None
    long = client.wait(long_id, timeout=TIMEOUT)
    assert long["images"][0]["steps_run"] == 60 and long["images"][0]["shared_max"] == 2
    assert 1.0 < long["images"][0]["shared_mean"] < 1.1
    # the short job alone on the worker: the same pixels
    again = client.wait(client.submit(short), timeout=TIMEOUT)
    assert again["images"][0]["shared_max"] == 1
    assert np.abs(pixels(s3_object(settings, image["key"]))
                  - pixels(s3_object(settings, again["images"][0]["key"]))).max() <= 1


def test_a_failing_loop_runs_each_job_alone_and_charges_only_the_culprit(settings, client, worker):
    from worker.tasks import generate

    engine = generate.context.engine
    original = engine.model.txt2img.unet
    culprit_rows = threading.Event()

    def flaky(sample, t, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the culprit's prompt makes any call holding it fail, alone or not
        if any(torch.equal(h, flaky.poison) for h in kwargs["encoder_hidden_states"]):
            culprit_rows.set()
            raise RuntimeError("the model cannot take this input (simulated)")
        return original(sample, t, *args, **kwargs)

    flaky.poison = engine.conditioning.get([Prompt("a cursed idol", "", False)])[0].embeds[0]
    engine.unet_call = flaky
    try:
        good_id = client.submit(small(prompt="a kind idol", num_inference_steps=40, seed=1))
        wait_for(lambda: client.get(good_id)["state"] == "running")
        bad_id = client.submit(small(prompt="a cursed idol", num_inference_steps=6, seed=2))
        good, bad = client.wait(good_id, timeout=TIMEOUT), client.wait(bad_id, timeout=TIMEOUT)
    finally:
        engine.unet_call = None
    assert culprit_rows.is_set()
    assert good["state"] == "succeeded" and good["failures"] == 0
    assert bad["failures"] >= 1 and "cannot take this input" in (bad["error"] or "")


def test_suspects_run_with_their_group_and_nothing_else_in_the_process():
    def w(job_id: str, created: float, group: str | None = None) -> Work:
        item = Work(job_id, CompatKey("txt2img", 256, 256, 3), [Sample(job_id, 0, 1, Prompt("p", "", False), 5.0)],
                    created, alone=group is not None, suspect_group=group)
        item.tokens = 77
        return item

    def room(item: Work) -> tuple[int, int]:
        return 0, 8 * 256 * 256

    batcher = Batcher(PixelBudget(8 * 256 * 256), window=0.0)
    for item in [w("other", 2.0), w("suspect", 1.0, "g1"), w("suspect-2", 3.0, "g2"), w("late", 4.0),
                 w("mate", 5.0, "g1")]:
        batcher.put(item)
    # the oldest is a suspect: while jobs run nothing joins (the loops drain), then its group runs
    assert batcher.admit(room, running=2) == []
    assert [i.job_id for i in batcher.admit(room)] == ["suspect", "mate"]
    assert batcher.admit(room, running=2, solo="g1") == []  # while group g1 runs: only more of g1
    batcher.put(w("mate-2", 6.0, "g1"))
    assert [i.job_id for i in batcher.admit(room, running=2, solo="g1")] == ["mate-2"]
    # the other group waits for its turn at the head of the line; the rest run together
    assert [i.job_id for i in batcher.admit(room)] == ["other", "late"]
    assert batcher.admit(room, running=2) == []
    assert [i.job_id for i in batcher.admit(room)] == ["suspect-2"]
