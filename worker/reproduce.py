"""`sdqueue reproduce`: make a job's images again on this machine, from its record, and compare them
with the stored ones pixel by pixel.

What it takes from the record: the job's request (prompt, negative prompt, steps, guidance, size,
strength), its seed (image i from seed + i), its img2img input from storage, the model the worker
ran (its registry name, else the folder its run recorded; `--model` overrides it), the scheduler
class and config the image's PNG recorded, and the kind of loop that made it (continuous or window
batching).
It runs the job's images together, as the job runs alone in a worker, through the worker's own
loading and generation code (worker/pipeline.py, worker/loop.py `run_direct`, worker/batch.py
`generate_batch`, as worker/replay.py replays a batch), on this machine's device and dtype.

What it tells: per image, `equal` when the pixel sha256 is the recorded one, else the largest
difference of a channel value (in 1/255) over how many pixels, and the PSNR. A difference within
the tolerance passes. Its default, when this machine's device type and dtype are the recorded
ones, is 1/255: a job's images do not depend on its batch mates within 1/255 (kernels may round a
batch of another size differently; tests/test_batch.py, tests/test_loop.py), a re-made job runs
without the mates it had, and perhaps on another number of CPU threads (1 thread against 2 changed
17 of 65,536 pixels of the tiny model by 1/255). Across device types or dtypes (CUDA fp16
recorded, CPU fp32 here) the pixels differ by more, by an amount no bound is promised for: no
default tolerance applies, and `--tolerance` says what to accept.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from models.db import Database
from models.errors import BadInput, JobError, SdqueueError
from models.images import pixel_sha256
from models.jobs import get_job
from models.registry import REGISTRY, resolve_model
from models.settings import Settings
from models.storage import Storage, open_storage
from models.tables import Batch, Image, Job, JobState
from worker.batch import generate_batch
from worker.samples import ConditioningCache, compat_key, job_samples
from worker.encode import encode_png, read_record, sha256_of
from worker.loop import run_direct
from worker.inputs import input_size, prepare_depth_map, prepare_input_image, prepare_mask
from worker.pipeline import LoadedModel, library_versions, load_model, pick_device, pin_torch_threads

# The default tolerance on the recorded device type and dtype, in 1/255 (see the docstring).
SAME_DEVICE_TOLERANCE = 1


class NotReproducible(BadInput):
    """The job has no images to make again (not succeeded), or --out cannot be written: exit 2."""


class ImageNotFound(SdqueueError, LookupError):
    """The job has no image of that index, or its object is missing from storage: exit 3."""


@dataclass
class Comparison:
    """One image made again, against the stored one."""

    index: int
    seed: int
    recorded: str  # the pixel sha256 recorded for it (the stored PNG's, for images made before it was)
    made: str  # the pixel sha256 of the image made here
    max_difference: int  # of a channel value, 0..255
    pixels_different: int  # pixels with any channel different
    psnr: float  # dB; inf when equal
    pixels: np.ndarray = field(repr=False)

    @property
    def equal(self) -> bool:
        return self.made == self.recorded

    def within(self, tolerance: int | None) -> bool:
        return self.equal or (tolerance is not None and self.max_difference <= tolerance)

    def describe(self) -> str:
        if self.equal:
            return f"equal (pixel sha256 {self.made})"
        return (f"max difference {self.max_difference}/255 over {self.pixels_different} pixels, "
                f"PSNR {self.psnr:.1f} dB")


@dataclass
class Reproduction:
    job_id: str
    model: str
    model_revision: str | None
    recorded_model_revision: str | None
    scheduler: str
    batching: str  # continuous | window: the loop that made the stored images, and these
    device: str
    dtype: str
    recorded_device: str
    recorded_dtype: str
    tolerance: int | None
    seconds: float
    images: list[Comparison]

    @property
    def ok(self) -> bool:
        return all(image.within(self.tolerance) for image in self.images)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "ok": self.ok, "tolerance": self.tolerance, "seconds": round(self.seconds, 3),
            "model": self.model, "model_revision": self.model_revision,
            "recorded_model_revision": self.recorded_model_revision, "scheduler": self.scheduler,
            "batching": self.batching, "device": self.device, "dtype": self.dtype,
            "recorded_device": self.recorded_device, "recorded_dtype": self.recorded_dtype,
            "images": [{"index": c.index, "seed": c.seed, "equal": c.equal, "recorded_pixel_sha256": c.recorded,
                        "pixel_sha256": c.made, "max_difference": c.max_difference,
                        "pixels_different": c.pixels_different,
                        "psnr": None if math.isinf(c.psnr) else round(c.psnr, 2),
                        "within_tolerance": c.within(self.tolerance)} for c in self.images],
        }

    def lines(self) -> list[str]:
        out = [f"job {self.job_id}: made again in {self.seconds:.1f} s with {self.model} ({self.scheduler}, "
               f"{self.batching} batching) on {self.device}/{self.dtype}; recorded on "
               f"{self.recorded_device}/{self.recorded_dtype}"]
        if self.model_revision != self.recorded_model_revision:
            out.append(f"note: model revision {self.model_revision} here, {self.recorded_model_revision} recorded")
        for c in self.images:
            verdict = "" if c.equal else (
                f" (within tolerance {self.tolerance}/255)" if c.within(self.tolerance) else
                f" (beyond tolerance {self.tolerance}/255)" if self.tolerance is not None else
                " (another device type or dtype: no default tolerance; --tolerance D accepts D/255)")
            out.append(f"image {c.index} (seed {c.seed}): {c.describe()}{verdict}")
        return out


@dataclass
class Stored:
    """What the record holds of one image: its row, the run that made it, its PNG and embedded record."""

    row: Image
    batch: Batch | None
    png: bytes
    record: dict[str, Any]

    def made_with(self, name: str) -> Any:
        """What the run that made it recorded (model_revision, scheduler, device, dtype): its batches
        row's, or the PNG record's for an image without one."""
        return getattr(self.batch, name) if self.batch is not None else self.record.get(name)


def reproduce(settings: Settings, job_id: str, *, index: int | None = None, model: str | None = None,
              device: str | None = None, tolerance: int | None = None, out: Path | None = None,
              force: bool = False) -> Reproduction:
    """Make job `job_id`'s images again here and compare them with the stored ones (all of them, or
    image `index`); `out`: write the re-made image there (one image only; not over a file unless
    `force`). `tolerance` None: the default (SAME_DEVICE_TOLERANCE on the recorded device type and
    dtype, else none)."""
    # 1. the record: the job, its images' rows and runs, the stored PNGs (before any model loads)
    db = Database(settings.database_url)
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    try:
        job, stored = read_stored(db, storage, job_id, index)
    finally:
        db.dispose()
    init = None
    if job.input_key is not None:  # img2img: its input, prepared as the worker prepares it
        if not storage.exists(job.input_key):
            raise ImageNotFound(f"the input image of job {job.id} is missing from storage "
                                f"({storage.location(job.input_key)})")
        init = prepare_input_image(storage.get(job.input_key), *input_size(job.params))
    mask = None
    if job.mask_key is not None:  # inpainting: its mask, prepared as the worker prepares it
        if not storage.exists(job.mask_key):
            raise ImageNotFound(f"the mask of job {job.id} is missing from storage ({storage.location(job.mask_key)})")
        mask = prepare_mask(storage.get(job.mask_key), job.width, job.height)
    depth_map = None
    if job.depth_key is not None:  # depth-to-image with the caller's map (else the model estimates it again)
        if not storage.exists(job.depth_key):
            raise ImageNotFound(f"the depth map of job {job.id} is missing from storage "
                                f"({storage.location(job.depth_key)})")
        depth_map = prepare_depth_map(storage.get(job.depth_key))
    if out is not None:
        check_out(out, force=force, images=len(stored))

    # 2. the model, as a worker loads it on this machine, with the recorded scheduler
    device = pick_device(device or settings.device)
    pin_torch_threads(settings.torch_threads, settings.workers_per_host, device)
    first = stored[0]
    loaded = load_model(resolve_model(model or recorded_model(job, first), settings.data_dir), device)
    scheduler = str(first.made_with("scheduler") or loaded.scheduler_name)
    use_scheduler(loaded, scheduler, first.record.get("scheduler_config"))

    # 3. the job's images, made together as the job runs alone, in the loop that made them
    batching = "window" if first.row.steps_run is None else "continuous"
    clock = time.perf_counter()
    made = make_again(loaded, job, init, batching, mask, depth_map)
    seconds = time.perf_counter() - clock

    # 4. compare
    comparisons = [compare(s, made[s.row.index]) for s in stored]
    recorded_device, recorded_dtype = str(first.made_with("device")), str(first.made_with("dtype"))
    if tolerance is None and same_kind(recorded_device, recorded_dtype, loaded.device, loaded.dtype_name):
        tolerance = SAME_DEVICE_TOLERANCE
    result = Reproduction(
        job_id=job.id, model=loaded.spec.name, model_revision=loaded.revision,
        recorded_model_revision=first.made_with("model_revision"),
        scheduler=scheduler, batching=batching, device=loaded.device, dtype=loaded.dtype_name,
        recorded_device=recorded_device, recorded_dtype=recorded_dtype, tolerance=tolerance, seconds=seconds,
        images=comparisons,
    )
    if out is not None:
        write_png(out, comparisons[0].pixels, {**first.record, "device": loaded.device, "dtype": loaded.dtype_name,
                                               "versions": library_versions(), "pixel_sha256": comparisons[0].made},
                  force=force)
    return result


def read_stored(db: Database, storage: Storage, job_id: str, index: int | None) -> tuple[Job, list[Stored]]:
    """The job and its stored images (all, or image `index`), each checked against its recorded sha256."""
    with db.session() as session:
        job = get_job(session, job_id)  # JobNotFound: exit 3
        if job.state != JobState.SUCCEEDED.value:
            raise NotReproducible(f"job {job.id} is {job.state}: only a succeeded job has images to make again")
        rows = [row for row in job.images if index is None or row.index == index]
        if not rows:
            have = ", ".join(str(row.index) for row in job.images)
            raise ImageNotFound(f"job {job.id} has no image {index} (its images: {have})")
        batch_ids = {row.batch_id for row in rows if row.batch_id is not None}
        batches = {b.id: b for b in session.scalars(select(Batch).where(Batch.id.in_(batch_ids)))}
    stored = []
    for row in rows:
        if not storage.exists(row.object_key):
            raise ImageNotFound(f"image {row.index} of job {job.id} is missing from storage "
                                f"({storage.location(row.object_key)})")
        png = storage.get(row.object_key)
        if sha256_of(png) != row.sha256:
            raise SdqueueError(f"image {row.index} of job {job.id} in storage is not the one recorded "
                               f"(its sha256 differs): it was changed after it was stored")
        stored.append(Stored(row, batches.get(row.batch_id or ""), png, read_record(png)))
    return job, stored


def recorded_model(job: Job, stored: Stored) -> str:
    """The model that made the job, as this machine finds it: its registry name (a built model
    from this data dir, hub weights from the cache), else the folder it was loaded from."""
    if job.model in REGISTRY:
        return job.model
    source = stored.batch.model if stored.batch is not None else stored.record.get("model_source")
    return str(source or job.model)


def use_scheduler(model: LoadedModel, name: str, config: dict[str, Any] | None) -> None:
    """The recorded scheduler (class and config) on both pipelines of `model`."""
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None:
        raise SdqueueError(f"the recorded scheduler {name!r} is not in this diffusers ({diffusers.__version__})")
    scheduler = scheduler_cls.from_config(config or model.txt2img.scheduler.config)
    for pipe in (model.txt2img, model.img2img, model.inpainting, model.upscaler, model.depth):
        if pipe is not None:
            pipe.scheduler = scheduler


def make_again(model: LoadedModel, job: Job, init: PILImage.Image | None, batching: str,
               mask: PILImage.Image | None = None, depth_map: PILImage.Image | None = None) -> list[np.ndarray]:
    """The job's images, in index order, made in one loop of its own: a continuous loop
    (worker/loop.py) or a window batch (worker/batch.py), as the worker made them."""
    depth = job.mode == "depth"
    key = compat_key(job.params, img2img=init is not None, inpaint=mask is not None, depth=depth)
    if batching == "continuous":
        made = run_direct(model, [{"job_id": job.id, "params": job.params, "seed": job.seed, "init_image": init,
                                   "mask_image": mask, "depth": depth, "depth_map": depth_map}],
                          pixel_budget=key.pixels * job.num_images)
        return list(made[job.id])
    samples = job_samples(job.id, job.params, job.seed, init, mask, depth=depth, depth_map=depth_map)
    if key.mode in ("img2img", "depth") and key.start_step >= key.steps:  # strength 0 keeps the input (Engine.generate)
        return [np.asarray(s.init_image.convert("RGB")) for s in samples]  # type: ignore[union-attr]
    results = generate_batch(model, key, samples, ConditioningCache(model).get([s.prompt for s in samples]))
    for result in results:
        if isinstance(result, JobError):
            raise result
    return results


def compare(stored: Stored, made: np.ndarray) -> Comparison:
    with PILImage.open(io.BytesIO(stored.png)) as img:
        theirs = np.asarray(img.convert("RGB"))
    recorded = stored.row.pixel_sha256 or pixel_sha256(theirs)
    if theirs.shape != made.shape:
        raise SdqueueError(f"image {stored.row.index}: made {made.shape[1]}x{made.shape[0]}, stored "
                           f"{theirs.shape[1]}x{theirs.shape[0]}")
    diff = np.abs(theirs.astype(np.int16) - made.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return Comparison(
        index=stored.row.index, seed=stored.row.seed, recorded=recorded, made=pixel_sha256(made),
        max_difference=int(diff.max()), pixels_different=int(diff.any(axis=2).sum()),
        psnr=math.inf if mse == 0 else 10 * math.log10(255**2 / mse), pixels=made,
    )


def same_kind(recorded_device: str, recorded_dtype: str, device: str, dtype: str) -> bool:
    """Whether this run's device type (cpu, cuda: not the card's number) and dtype are the recorded ones."""
    return recorded_device.split(":")[0] == device.split(":")[0] and recorded_dtype == dtype


def check_out(path: Path, *, force: bool, images: int) -> None:
    if images != 1:
        raise NotReproducible(f"--out writes one image: the job has {images}, choose one with --index")
    if path.is_dir():
        raise NotReproducible(f"--out {path}: is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise NotReproducible(f"--out {path}: the file exists (--force writes over it)")
    if not path.parent.is_dir():
        raise NotReproducible(f"--out {path}: no folder {path.parent}")


def write_png(path: Path, pixels: np.ndarray, record: dict[str, Any], *, force: bool) -> None:
    """The re-made image as a PNG with its record, written whole (a temporary file renamed into place)."""
    check_out(path, force=force, images=1)
    png = encode_png(PILImage.fromarray(pixels), record)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as part:
            part.write(png)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
