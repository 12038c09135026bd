"""Grouping: compatibility key, pixel budget, the window, oldest first; interactive before bulk, with
bulk's share of the batches; and the out-of-memory split."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from worker.samples import CompatKey, Prompt, Sample
from worker.batcher import Batcher, PixelBudget, Work, plan_batch

K512 = CompatKey("txt2img", 512, 512, 25)
K768 = CompatKey("txt2img", 768, 768, 25)
I768 = CompatKey("img2img", 768, 768, 25, start_step=5)


def work(job_id: str, key: CompatKey, created: float, images: int = 1, tokens: int = 77, arrived: float = 0.0,
         priority: str = "interactive") -> Work:
    samples = [Sample(job_id, i, i, Prompt("p", "", False), 7.5) for i in range(images)]
    return Work(job_id, key, samples, created, priority=priority, arrived=arrived, tokens=tokens)


def bulk(job_id: str, key: CompatKey, created: float, **kwargs) -> Work:  # type: ignore[no-untyped-def]
    return work(job_id, key, created, priority="bulk", **kwargs)


def ids(batch: list[Work]) -> list[str]:
    return [w.job_id for w in batch]


def test_oldest_job_group_goes_first_and_fills_in_age_order():
    pending = [work("new768", K768, 5), work("a512", K512, 1), work("b512", K512, 3), work("old768", K768, 0)]
    batch, _ = plan_batch(pending, PixelBudget(8 * 768 * 768), window=0, now=10)
    assert ids(batch) == ["old768", "new768"]


def test_budget_counts_images_and_a_big_job_runs_alone():
    budget = PixelBudget(4 * 512 * 512)
    pending = [work("a", K512, 1, images=3), work("b", K512, 2, images=2), work("c", K512, 3, images=1)]
    batch, _ = plan_batch(pending, budget, window=0, now=10)
    assert ids(batch) == ["a"]  # b would pass the budget; c may not jump ahead of b
    batch, _ = plan_batch([work("huge", K768, 0, images=4)], PixelBudget(2 * 768 * 768), window=0, now=10)
    assert ids(batch) == ["huge"]


def test_keys_never_mix():
    pending = [work("t", K768, 0), work("i", I768, 1), work("i2", CompatKey("img2img", 768, 768, 25, 6), 2)]
    batch, _ = plan_batch(pending, PixelBudget(10**9), window=0, now=10)
    assert ids(batch) == ["t"]
    batch, _ = plan_batch(pending[1:], PixelBudget(10**9), window=0, now=10)
    assert ids(batch) == ["i"]


def test_conditioning_length_is_part_of_the_group():
    pending = [work("short", K512, 0), work("long", K512, 1, tokens=154), work("short2", K512, 2)]
    batch, _ = plan_batch(pending, PixelBudget(10**9), window=0, now=10)
    assert ids(batch) == ["short", "short2"]


def test_unfilled_batch_waits_for_its_window_a_full_one_does_not():
    budget = PixelBudget(2 * 512 * 512)
    batch, wait = plan_batch([work("a", K512, 0, arrived=100.0)], budget, window=0.2, now=100.05)
    assert batch == [] and wait == pytest.approx(0.15)
    batch, _ = plan_batch([work("a", K512, 0, arrived=100.0)], budget, window=0.2, now=100.25)
    assert ids(batch) == ["a"]
    full = [work("a", K512, 0, arrived=100.0), work("b", K512, 1, arrived=100.0)]
    batch, _ = plan_batch(full, budget, window=0.2, now=100.0)
    assert ids(batch) == ["a", "b"]


def test_a_busy_key_does_not_starve_an_older_one():
    budget = PixelBudget(2 * 512 * 512)
    pending = [work("lonely768", K768, 0)] + [work(f"busy{i}", K512, 1 + i) for i in range(6)]
    order = []
    while pending:
        batch, _ = plan_batch(pending, budget, window=0, now=10)
        order.append(ids(batch))
        pending = [w for w in pending if w not in batch]
    assert order[0] == ["lonely768"] and order[1] == ["busy0", "busy1"]


def test_batcher_hands_a_batch_to_the_gpu_thread_after_the_window():
    batcher = Batcher(PixelBudget(4 * 512 * 512), window=0.15)
    stop = threading.Event()
    start = time.monotonic()
    for name in ("a", "b"):
        batcher.put(work(name, K512, time.time(), arrived=time.monotonic()))
    batch = batcher.take(stop, timeout=5)
    assert ids(batch) == ["a", "b"] and time.monotonic() - start >= 0.14  # not full: it waited the window
    assert len(batcher) == 0


def test_interactive_group_goes_before_an_older_bulk_one():
    pending = [bulk("bulk768", K768, 0), bulk("bulk512", K512, 1), work("new512", K512, 5), work("newer768", K768, 6)]
    batch, _ = plan_batch(pending, PixelBudget(10**9), window=0, now=10)
    assert ids(batch) == ["new512", "bulk512"]  # the oldest interactive job's group, with its bulk jobs after
    batch, _ = plan_batch([bulk("b2", K512, 2), bulk("b1", K512, 1)], PixelBudget(10**9), window=0, now=10)
    assert ids(batch) == ["b1", "b2"]  # no interactive work: bulk by age


def test_a_group_fills_with_interactive_work_first_then_bulk():
    budget = PixelBudget(3 * 512 * 512)
    pending = [bulk("b0", K512, 0), bulk("b1", K512, 1), work("i5", K512, 5), bulk("b2", K512, 2), work("i6", K512, 6)]
    batch, _ = plan_batch(pending, budget, window=0, now=10)
    assert ids(batch) == ["i5", "i6", "b0"]
    batch, _ = plan_batch(pending, budget, window=0, now=10, by_age=True)
    assert ids(batch) == ["b0", "b1", "b2"]  # bulk's turn: age alone


def test_window_is_that_of_the_batch_leader():
    budget = PixelBudget(4 * 512 * 512)
    pending = [bulk("b", K512, 0, arrived=50.0), work("i", K512, 5, arrived=100.0)]
    batch, wait = plan_batch(pending, budget, window=0.2, now=100.05)
    assert batch == [] and wait == pytest.approx(0.15)  # the interactive job arrived last: its window is open
    batch, _ = plan_batch(pending, budget, window=0.2, now=100.05, by_age=True)
    assert ids(batch) == ["b", "i"]  # the bulk job's window closed long ago


def take_all(batcher: Batcher) -> list[list[str]]:
    order, stop = [], threading.Event()
    while len(batcher):
        order.append(ids(batcher.take(stop, timeout=0)))
    return order


@pytest.mark.parametrize("share", [1, 2, 4])
def test_bulk_leads_at_least_one_batch_in_bulk_share_under_an_interactive_flood(share):
    batcher = Batcher(PixelBudget(512 * 512), window=0, bulk_share=share)
    for i in range(3):
        batcher.put(bulk(f"b{i}", K768, i))  # older, and of another group: no ride in interactive batches
    for i in range(12):
        batcher.put(work(f"i{i}", K512, 10 + i))
    order = take_all(batcher)
    bulk_turns = [n for n, batch in enumerate(order) if batch[0].startswith("b")]
    assert bulk_turns == [share - 1, 2 * share - 1, 3 * share - 1]
    assert [b for b in order if b[0].startswith("i")] == [[f"i{i}"] for i in range(12)]


def test_the_guard_counts_only_while_bulk_waits_and_by_age_may_pick_interactive():
    batcher = Batcher(PixelBudget(512 * 512), window=0, bulk_share=2)
    for i in range(4):
        batcher.put(work(f"i{i}", K512, i))
    assert take_all(batcher) == [["i0"], ["i1"], ["i2"], ["i3"]]  # no bulk waiting: no turn owed
    batcher.put(work("old0", K512, 0))
    batcher.put(work("old1", K512, 1))
    batcher.put(bulk("b", K768, 5))
    for i in range(2):
        batcher.put(work(f"new{i}", K512, 10 + i))
    # The second batch goes by age: "old1" is older than "b", so it leads, and the count starts
    # again; "b" leads the next turn by age.
    assert take_all(batcher) == [["old0"], ["old1"], ["new0"], ["b"], ["new1"]]


def test_bulk_share_must_be_at_least_one():
    with pytest.raises(ValueError, match="bulk_share"):
        Batcher(PixelBudget(512 * 512), window=0, bulk_share=0)


def test_bulk_share_is_a_setting(monkeypatch):
    from models.errors import ConfigError
    from models.settings import load_settings

    assert load_settings().bulk_share == 4
    monkeypatch.setenv("SDQUEUE_BULK_SHARE", "2")
    assert load_settings().bulk_share == 2
    monkeypatch.setenv("SDQUEUE_BULK_SHARE", "0")
    with pytest.raises(ConfigError, match="bulk_share|greater than or equal to 1"):
        load_settings()


def test_out_of_memory_splits_the_batch_with_the_same_images(data_dir):
    from models.registry import resolve_model
    from worker.engine import Engine
    from worker.pipeline import load_model

    model = load_model(resolve_model("tiny", data_dir), "cpu")
    engine = Engine(model, db=None, storage=None, hostname="test", pixel_budget=8 * 256 * 256, window=0)  # type: ignore[arg-type]
    key = CompatKey("txt2img", 256, 256, 3)
    samples = [Sample(f"j{i}", 0, 40 + i, Prompt(f"prompt {i % 3}", "", i % 2 == 1), 5.0 + i) for i in range(5)]
    conditioning = engine.conditioning.get([s.prompt for s in samples])
    whole = engine.generate(key, samples, conditioning)

    sizes = []

    def small_gpu(sample, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(sample.shape[0] // 2)
        if sample.shape[0] // 2 > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return model.txt2img.unet(sample, *args, **kwargs)

    engine.unet_call = small_gpu
    split = engine.generate(key, samples, conditioning)
    engine.stop()
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(whole, split)) <= 1
    assert set(sizes) == {5, 2, 1, 3}  # 5 failed, 2 ran, 3 failed, then 1 and 2 ran
    assert engine.budget.for_key(key) == 2 * 256 * 256  # the budget for 256x256 shrank to what ran
    assert engine.budget.for_key(CompatKey("txt2img", 512, 512, 3)) == 8 * 256 * 256  # other shapes keep theirs
