"""The in-process side of bench/stream.py, on the model and device the workers use:

  - direct, continuous: worker.loop.run_direct, the scheduler a continuous worker runs, given the
    worker run's own jobs (params and seeds from their rows) admitted at the times they arrived
    there, so the loop holds what the worker's loop held; no Redis, database or storage;
  - direct, window: the batch function on the very batches the window worker recorded, back to
    back (worker/replay.py);
  - baseline: one diffusers pipeline call per job, what a hand-written Celery + diffusers worker does.

What the worker does beyond the direct figure (queue, claims, PNG encoding, uploads, records) is
its overhead; the direct figure runs in this process with the same torch threads as the worker.
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable

from bench.stream_worker import WARM_STEPS, WorkerProcess, warm_up_requests
from models.request import parse_request
from models.tables import Job


class Direct:
    def __init__(self, model: Any, pixel_budget: int):
        import torch

        self.model = model
        self.pixel_budget = pixel_budget
        self.sync: Callable[[], None] = torch.cuda.synchronize if model.device.startswith("cuda") else (lambda: None)
        self._engines: dict[str, Any] = {}  # replay engines, by the window worker's database

    # -- continuous ---------------------------------------------------------------------------

    def continuous(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """run_direct over `jobs`, timed from the first arrival to the last image."""
        from worker.loop import run_direct

        self.sync()
        started = time.perf_counter()
        out = run_direct(self.model, jobs, self.pixel_budget)
        self.sync()
        seconds = time.perf_counter() - started
        images = sum(len(v) for v in out.values())
        expected = sum(j["params"]["num_images"] for j in jobs)
        if images != expected:
            raise RuntimeError(f"run_direct made {images} images, the jobs ask for {expected}")
        return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 4)}

    def warm_continuous(self, shapes: set[tuple[int, int, bool]]) -> None:
        from worker.inputs import prepare_input_image

        jobs = []
        for request in warm_up_requests(shapes):
            init = None
            if "image" in request:
                init = prepare_input_image(request["image"], request["width"], request["height"])
            params = parse_request(request).parameters()
            jobs.append({"job_id": f"warm-{len(jobs)}", "params": params, "seed": 0, "init_image": init})
        self.continuous(jobs)

    @staticmethod
    def jobs_of(worker: WorkerProcess, job_ids: list[str]) -> list[dict[str, Any]]:
        """run_direct's jobs from a worker run's rows, arriving when they were created there."""
        from worker.inputs import prepare_input_image

        with worker.client.db.session() as session:
            rows = session.query(Job).filter(Job.id.in_(job_ids)).order_by(Job.created_at).all()
            first = rows[0].created_at
            jobs = []
            for row in rows:
                init = None
                if row.input_key is not None:
                    init = prepare_input_image(worker.client.storage.get(row.input_key), row.width, row.height)
                jobs.append({"job_id": row.id, "params": dict(row.params), "seed": row.seed, "init_image": init,
                             "arrive_at": (row.created_at - first).total_seconds()})
        return jobs

    # -- window -------------------------------------------------------------------------------

    def window(self, worker: WorkerProcess, batch_ids: list[str], warm: bool = False) -> dict[str, Any]:
        """The window worker's recorded batches made again, back to back."""
        from worker.replay import replay_batch

        engine = self._engine(worker)
        db, storage = worker.client.db, worker.client.storage
        if warm:
            replay_batch(engine, db, storage, batch_ids[0])
        self.sync()
        started = time.perf_counter()
        images = sum(len(replay_batch(engine, db, storage, batch_id)) for batch_id in batch_ids)
        self.sync()
        seconds = time.perf_counter() - started
        return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 4)}

    def _engine(self, worker: WorkerProcess) -> Any:
        from worker.engine import Engine

        key = worker.settings.database_url
        if key not in self._engines:
            self._engines[key] = Engine(self.model, worker.client.db, worker.client.storage, "bench",
                                        pixel_budget=10**9, window=0, batching="window")
        return self._engines[key]

    # -- baseline -----------------------------------------------------------------------------

    def baseline(self, stream: list[dict[str, Any]], warm: bool = False) -> dict[str, Any]:
        """One diffusers pipeline call per job (the hand-written worker), same model and device."""
        if warm:  # a short call per shape
            for shape in {(r["width"], r["height"], "image" in r): r for r in stream}.values():
                self.one_call({**shape, "num_images": 1, "num_inference_steps": WARM_STEPS, "strength": 1.0})
        self.sync()
        started = time.perf_counter()
        for request in stream:
            self.one_call(request)
        self.sync()
        seconds = time.perf_counter() - started
        images = sum(r["num_images"] for r in stream)
        return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 4)}

    def one_call(self, request: dict[str, Any]) -> None:
        import torch
        from PIL import Image

        model = self.model
        generators = [torch.Generator("cpu").manual_seed(request["seed"] + i) for i in range(request["num_images"])]
        common = dict(prompt=request["prompt"], negative_prompt=request["negative_prompt"],
                      num_images_per_prompt=request["num_images"], num_inference_steps=request["num_inference_steps"],
                      guidance_scale=request["guidance_scale"], generator=generators, output_type="pil")
        if "image" in request:
            model.img2img(**common, image=Image.open(io.BytesIO(request["image"])).convert("RGB"),
                          strength=request["strength"])
        else:
            model.txt2img(**common, width=request["width"], height=request["height"])

    def timed_call(self, request: dict[str, Any]) -> float:
        self.sync()
        started = time.perf_counter()
        self.one_call(request)
        self.sync()
        return time.perf_counter() - started

    def close(self) -> None:
        for engine in self._engines.values():
            engine.stop()
