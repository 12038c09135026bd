"""The worker's engine: one GPU thread runs batches; a small pool encodes, uploads and records.

Celery task threads claim their jobs and hand them to the engine; the GPU thread takes the next
batch from the batcher, denoises it, and passes the images to the CPU pool, so PNG encoding,
uploads and database writes run beside the next batch's denoising. At most `max_in_flight`
finished batches wait for the pool: beyond that the GPU thread waits (bounded memory).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from models import jobs
from models.db import Database
from models.storage import Storage, object_key_for
from models.tables import Batch, Image, utcnow
from worker.batch import CompatKey, ConditioningCache, Sample, UnetCall, generate_batch, is_out_of_memory
from worker.batcher import Batcher, PixelBudget, Work
from worker.encode import encode_png, sha256_of
from worker.pipeline import LoadedModel, library_versions

log = logging.getLogger(__name__)


def default_pixel_budget(device: str) -> int:
    """8 images of 768x768 on an 80 GB card (12.3 GB measured for that batch), scaled by memory;
    on the CPU, what keeps a batch of the tiny model at a few seconds."""
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return max(768 * 768, int(8 * 768 * 768 * total / (80 * 2**30)))
    return 16 * 256 * 256


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        db: Database,
        storage: Storage,
        hostname: str,
        *,
        pixel_budget: int,
        window: float,
        cpu_workers: int = 2,
        max_in_flight: int = 2,
    ):
        self.model = model
        self.db = db
        self.storage = storage
        self.hostname = hostname
        self.budget = PixelBudget(pixel_budget)
        self.batcher = Batcher(self.budget, window)
        self.conditioning = ConditioningCache(model)
        self.unet_call: UnetCall | None = None  # tests wrap the UNet here
        self.versions = library_versions()
        self._cpu = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="sdqueue-cpu")
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdqueue-gpu", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> Any:
        """Queue a claimed job; its future resolves to the job's final state."""
        if self._stop.is_set():
            raise RuntimeError("the engine has stopped")
        return self.batcher.put(work)

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._cpu.shutdown(wait=True)

    # --- the GPU thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for work in self.batcher.unprepared():
                self._prepare(work)
            batch = self.batcher.take(self._stop, timeout=0.5)
            try:
                if batch:
                    self._run(batch)
            except Exception as exc:  # never leave a task thread waiting on a dead engine
                log.exception("engine error")
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(exc)

    def _prepare(self, work: Work) -> None:
        """Text conditioning for a new job (cached by prompt); a prompt compel cannot parse fails its job alone."""
        try:
            work.conditioning = self.conditioning.get([s.prompt for s in work.samples])
            work.tokens = work.conditioning[0].tokens
        except Exception as exc:
            self.batcher.drop(work)
            work.future.set_exception(exc)

    def _run(self, batch: list[Work]) -> None:
        key = batch[0].key
        samples = [s for w in batch for s in w.samples]
        conditioning = [c for w in batch for c in w.conditioning or []]
        if self.model.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started, clock = utcnow(), time.perf_counter()
        try:
            images = self.generate(key, samples, conditioning)
        except Exception as exc:
            log.exception("batch %s of %d job(s) failed", key, len(batch))
            for work in batch:
                work.future.set_exception(exc)
            return
        seconds = time.perf_counter() - clock
        peak = torch.cuda.max_memory_allocated() if self.model.device.startswith("cuda") else None
        record = Batch(
            id=str(uuid.uuid4()), worker=self.hostname, model=self.model.source if self.model.spec.hub_id is None
            else self.model.spec.hub_id, model_revision=self.model.revision, scheduler=self.model.scheduler_name,
            device=self.model.device, dtype=self.model.dtype_name, size=len(samples), versions=self.versions,
            compat_key=str(key), jobs=len(batch), seconds=seconds, peak_memory_bytes=peak, started_at=started,
        )
        log.info("batch %s: %d job(s), %d image(s) in %.2f s", key, len(batch), len(samples), seconds)
        self._in_flight.acquire()  # back-pressure: wait while the pool is behind
        self._cpu.submit(self._finish, batch, record, images)

    def generate(self, key: CompatKey, samples: list[Sample], conditioning: list[Any]) -> list[np.ndarray]:
        """The batch's images; out of memory splits it in halves (same images) and shrinks the budget."""
        if key.mode == "img2img" and key.start_step >= key.steps:
            return [np.asarray(s.init_image.convert("RGB")) for s in samples]  # strength 0 keeps the input
        try:
            return generate_batch(self.model, key, samples, conditioning, self.unet_call)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(samples) == 1:
                raise
        self.budget.shrink(key, len(samples) * key.pixels)
        if self.model.device.startswith("cuda"):
            torch.cuda.empty_cache()
        half = len(samples) // 2
        log.warning("out of memory on %d samples of %s: splitting; budget now %d px", len(samples), key,
                    self.budget.for_key(key))
        return self.generate(key, samples[:half], conditioning[:half]) + self.generate(
            key, samples[half:], conditioning[half:]
        )

    # --- the CPU pool -------------------------------------------------------------------------

    def _finish(self, batch: list[Work], record: Batch, images: list[np.ndarray]) -> None:
        try:
            record.finished_at = utcnow()
            with self.db.session() as session:
                session.add(record)
            position = 0
            for work in batch:
                mine = images[position : position + len(work.samples)]
                try:
                    work.future.set_result(self._store(work, record, position, mine))
                except Exception as exc:
                    work.future.set_exception(exc)
                position += len(work.samples)
        except Exception as exc:
            for work in batch:
                if not work.future.done():
                    work.future.set_exception(exc)
        finally:
            self._in_flight.release()

    def _store(self, work: Work, batch: Batch, first: int, images: list[np.ndarray]) -> str:
        """Encode, upload, then record one job's images; returns the job's final state."""
        rows = []
        for offset, (sample, pixels) in enumerate(zip(work.samples, images)):
            picture = PILImage.fromarray(pixels)
            png = encode_png(picture, self.image_record(work, sample, batch, first + offset))
            key = object_key_for(work.job_id, sample.index)
            self.storage.put(key, png, content_type="image/png")
            rows.append(Image(
                job_id=work.job_id, index=sample.index, seed=sample.seed, object_key=key, sha256=sha256_of(png),
                size_bytes=len(png), width=picture.width, height=picture.height, batch_id=batch.id,
                batch_size=batch.size, batch_position=first + offset,
            ))
        with self.db.session() as session:
            try:
                jobs.succeed(session, work.job_id, rows)
            except jobs.IllegalTransition as exc:
                log.info("job %s: %s (cancelled while it ran); its images are not recorded", work.job_id, exc)
                return exc.current.value
        return "succeeded"

    def image_record(self, work: Work, sample: Sample, batch: Batch, position: int) -> dict[str, Any]:
        """Everything needed to make this image again; embedded in its PNG."""
        return {
            **work.params,
            "job_id": work.job_id,
            "index": sample.index,
            "seed": sample.seed,
            "mode": work.key.mode,
            "input_sha256": work.input_sha256,
            "model": self.model.spec.name,
            "model_source": batch.model,
            "model_revision": self.model.revision,
            "scheduler": self.model.scheduler_name,
            "scheduler_config": dict(self.model.txt2img.scheduler.config),
            "device": self.model.device,
            "dtype": self.model.dtype_name,
            "batch_id": batch.id,
            "batch_size": batch.size,
            "batch_position": position,
            "compat_key": batch.compat_key,
            "versions": self.versions,
        }
