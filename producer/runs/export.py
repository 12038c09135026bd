"""A run's images as a dataset: an image folder, WebDataset shards, Parquet or a `save_to_disk` folder.

    sdqueue export RUN DEST --format imagefolder|webdataset|parquet|hf [--split train=0.98,validation=0.02]

DEST is a folder or an s3://bucket/prefix URI, written through the same storage code as the
images (SDQUEUE_S3_ENDPOINT_URL, SDQUEUE_S3_REGION). The run's succeeded jobs and their images
are read a page at a time, images are fetched from storage a few at a time on threads, each one
checked against the sha256 the database recorded, and written in order: memory stays bounded
whatever the size of the run. Every file is built in a temporary file and then renamed or
uploaded, so a reader never sees half of one; files get the mode a plain `open` gives (0644 under
the usual umask), folders 0755. In a folder an export never writes over a file that is there
(unless `force`), and when the disk fails (full, read-only, an I/O error) it removes every file
and folder it made and raises OutputFailed.

Every row (one image) carries its whole record: `text` (the prompt), the job's parameters, the
image's seed, sha256 and `pixel_sha256` (of the decoded RGB pixels; null for images made before
schema 0009), and how it was made: `model` (the registry name), `model_source` (hub id or folder),
`model_revision`, `scheduler`, `scheduler_config` (JSON, read from the PNG's record) and
`versions` (JSON). Parquet and Arrow files also hold the run's models in their schema metadata
(`sdqueue`), beside the `huggingface` features.

Splits (`split`, see producer/runs/splits.py) go where `datasets` finds them by name. Layouts,
unsplit / split:
- imagefolder: DEST/images/JOBID-INDEX.png and DEST/metadata.jsonl, one line per image with
  `file_name` (what `datasets.load_dataset("imagefolder", data_dir=DEST)` reads) / the same in
  DEST/train/, DEST/validation/, ...
- webdataset: DEST/00000.tar, 00001.tar, ... / DEST/train-000000.tar, ...: shards of at most
  `shard_size` samples, each sample KEY.png, KEY.txt (the prompt) and KEY.json (its row); beside
  each shard its index, the same name with .parquet (the img2dataset convention).
- parquet: DEST/data/train-00000-of-00002.parquet, ... (all rows in `train` when unsplit): the
  image in the Hugging Face `Image` layout (a struct of bytes and path) beside the row, for
  `datasets.load_dataset("parquet", data_dir=DEST)` or any Parquet reader; `shard_size` rows a file.
- hf: what `datasets.load_from_disk(DEST)` opens, written with pyarrow alone: a Dataset
  (DEST/data-00000-of-00001.arrow, dataset_info.json, state.json) / a DatasetDict (the same in
  DEST/train/, DEST/validation/, ..., and DEST/dataset_dict.json).

This module reads the run and drives the export; the folder or S3 prefix written to is
producer/runs/destination.py, the formats producer/runs/writers.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

from sqlalchemy import func, select

from models.db import Database
from models.errors import BadDestination, RunNotFound, SdqueueError, StorageError
from models.settings import Settings
from models.storage import Storage, open_storage
from models.tables import Batch, Image, Job, JobState, Run
from producer.outputs import OutputFailed
from producer.runs.destination import Destination
from producer.runs.splits import Splits, parse_split
from producer.runs.writers import (COLUMNS, GROUP_BYTES, GROUP_ROWS, STALE, ExportReport, Options, markers, sample_key,
                                   write_hf, write_imagefolder, write_parquet, write_webdataset)

# The entry and what it returns and raises; the rest are re-exported from writers.py and
# destination.py for code that imported them from here before the split.
__all__ = ["FORMATS", "ExportError", "ExportReport", "export_run", "png_record",
           "COLUMNS", "Destination", "GROUP_BYTES", "GROUP_ROWS", "STALE", "sample_key"]

FORMATS = ("imagefolder", "webdataset", "parquet", "hf")
# Jobs read per query: a page holds at most 4x as many images.
PAGE_JOBS = 500
# The text chunk of an sdqueue PNG holding its whole record (worker/encode.py RECORD_CHUNK).
RECORD_CHUNK = "sdqueue"
# Models listed in the schema metadata at most (one entry per model, revision and scheduler).
MAX_MODELS = 64


class ExportError(SdqueueError):
    """The run cannot be exported as asked (unfinished, a bad option), or an image in storage is
    not the one the database recorded. Whatever was already written stays in DEST."""


def export_run(
    settings: Settings,
    run_name: str,
    dest: str | os.PathLike[str],
    *,
    format: str,
    partial: bool = False,
    shard_size: int = 1000,
    concurrency: int = 8,
    progress: bool | None = None,
    force: bool = False,
    split: str | Mapping[str, float] | Splits | None = None,
) -> ExportReport:
    """Write the images of run `run_name` to `dest` as a dataset; see the module's docstring.

    Raises RunNotFound for an unknown run, ExportError for an unfinished run (unless `partial`),
    a bad option, or an image whose bytes do not match its recorded sha256. `split`:
    "train=0.98,validation=0.02" (or a mapping, or Splits): each row in one split, by its key.
    `progress`: show a progress bar on stderr (None: only when stderr is a terminal). `force`:
    write over an earlier export and any file in the way (otherwise BadDestination), and remove
    the earlier export's shards that this one did not write over (webdataset, parquet).
    OutputFailed when the destination folder fails (ENOSPC, EROFS, EIO...): what this export made
    there was removed.
    """
    # 1. check inputs
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: must be one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ExportError(f"shard_size={shard_size}: must be at least 1")
    if concurrency < 1:
        raise ExportError(f"concurrency={concurrency}: must be at least 1")
    try:
        splits = split if isinstance(split, Splits) or split is None else parse_split(split)
    except ValueError as exc:
        raise ExportError(f"split={str(split)[:80]!r}: {exc}") from None
    started = time.monotonic()
    db = Database(settings.database_url)
    try:
        # 2. the run, and whether it has finished
        with db.session() as session:
            run = session.scalars(select(Run).where(Run.name == run_name)).one_or_none()
            if run is None:
                raise RunNotFound(run_name)
            run_id = run.id
            counts = dict(session.execute(
                select(Job.state, func.count()).where(Job.run_id == run_id).group_by(Job.state)).all())
            expected = session.scalar(select(func.sum(Job.num_images)).where(
                Job.run_id == run_id, Job.state == JobState.SUCCEEDED.value)) or 0
        states = {state.value: counts.get(state.value, 0) for state in JobState}
        unfinished = states[JobState.QUEUED.value] + states[JobState.RUNNING.value]
        if unfinished and not partial:
            by_state = ", ".join(f"{n} {state}" for state, n in states.items() if n)
            raise ExportError(f"run {run_name} has not finished ({by_state}): wait for it, or give --partial "
                              f"to export the {states[JobState.SUCCEEDED.value]} succeeded job(s) so far")
        # 3. where images come from and where the dataset goes
        source = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        target = Destination.open(str(dest), settings, markers=markers(format, splits), force=force)
        report = ExportReport(run_name, format, target.url)
        if splits is not None:
            report.splits = dict.fromkeys(splits.names, 0)
        # 4. the run's models, for the schema metadata of Parquet and Arrow files
        about = {"run": run_name, "split": str(splits) if splits else None,
                 "models": _run_models(db, run_id, source) if format in ("parquet", "hf") else []}
        # 5. the images, read page by page, fetched and checked concurrently, written in order
        rows = _index_rows(db, run_id, run_name, source)
        bar = _progress_bar(expected, progress)
        try:
            writer = {"imagefolder": write_imagefolder, "webdataset": write_webdataset,
                      "parquet": write_parquet, "hf": write_hf}[format]
            try:
                writer(rows, _checked_fetch(source), target, report,
                       Options(shard_size, concurrency, splits, about, bar.update if bar is not None else None))
                if force and format in STALE:  # written over: no shard of an earlier export is left
                    target.prune(*STALE[format])
            except (OSError, OutputFailed, BadDestination) as exc:  # the destination's: nothing of it is left
                target.undo()
                why = (exc.strerror or " ".join(str(exc).split())) if isinstance(exc, OSError) else str(exc)
                kind = BadDestination if isinstance(exc, BadDestination) else OutputFailed
                raise kind(f"export to {target.url} stopped: {why}; the files it wrote were removed") from None
        finally:
            if bar is not None:
                bar.close()
    finally:
        db.dispose()
    # 6. what was left out: counted at the start; with --partial, jobs that ended meanwhile are
    #    whatever was not exported
    report.left_out = {state: n for state, n in states.items() if n and state != JobState.SUCCEEDED.value}
    report.seconds = time.monotonic() - started
    return report


# --- reading the run -------------------------------------------------------------------------

def _index_rows(db: Database, run_id: str, run_name: str, source: Storage) -> Iterator[tuple[dict[str, Any], str]]:
    """(index row, object key) of every image of the run's succeeded jobs, in (run key, image
    index) order, read a page of jobs at a time.

    Keyset pagination on run_key: (run_id, run_key) is unique and indexed, so each page is a
    range scan of the run's own jobs, however many other jobs the table holds. Every job of a
    run has a key (enqueue sets it).
    """
    after = ""
    while True:
        with db.session() as session:
            jobs = session.execute(
                select(Job.id, Job.run_key, Job.mode, Job.params, Job.num_inference_steps, Job.num_images, Job.model,
                       Job.input_sha256, Job.mask_sha256, Job.depth_sha256, Job.after_job_id, Job.after_index)
                .where(Job.run_id == run_id, Job.state == JobState.SUCCEEDED.value, Job.run_key > after)
                .order_by(Job.run_key)
                .limit(PAGE_JOBS)
            ).all()
            if not jobs:
                return
            images = session.execute(
                select(Image, Batch.model, Batch.model_revision, Batch.scheduler, Batch.versions)
                .outerjoin(Batch, Batch.id == Image.batch_id)
                .where(Image.job_id.in_([job.id for job in jobs]))
                .order_by(Image.job_id, Image.index)
            ).all()
        by_job: dict[str, list[Any]] = {}
        for made in images:
            by_job.setdefault(made[0].job_id, []).append(made)
        for job in jobs:
            params = job.params or {}
            for image, source_model, revision, scheduler, versions in by_job.get(job.id, []):
                prompt = params.get("prompt", "")
                row = {
                    "text": prompt, "job_id": job.id, "run": run_name, "key": job.run_key,
                    "prompt": prompt, "negative_prompt": params.get("negative_prompt", ""),
                    "mode": job.mode, "input_sha256": job.input_sha256, "mask_sha256": job.mask_sha256,
                    "after_job_id": job.after_job_id, "after_index": job.after_index,
                    "depth_sha256": job.depth_sha256,
                    "num_inference_steps": job.num_inference_steps,
                    "guidance_scale": _float(params.get("guidance_scale")), "strength": _float(params.get("strength")),
                    "width": image.width, "height": image.height, "num_images": job.num_images,
                    "use_compel": bool(params.get("use_compel", False)), "seed": image.seed,
                    "image_index": image.index, "model": job.model, "model_revision": revision,
                    "scheduler": scheduler, "scheduler_config": None,  # from the PNG, when fetched
                    "model_source": source_model,
                    "versions": json.dumps(versions, sort_keys=True) if versions is not None else None,
                    "object_uri": _locate(source, image.object_key), "sha256": image.sha256,
                    "pixel_sha256": image.pixel_sha256, "size_bytes": image.size_bytes,
                    "batch_id": image.batch_id, "batch_size": image.batch_size,
                    "batch_position": image.batch_position, "steps_run": image.steps_run,
                    "shared_max": image.shared_max, "shared_mean": image.shared_mean,
                    "created_at": image.created_at.isoformat() if image.created_at else None,
                }
                yield row, image.object_key
        after = jobs[-1].run_key


def _run_models(db: Database, run_id: str, source: Storage) -> list[dict[str, Any]]:
    """The models the run's succeeded jobs were made with: one entry per model, source,
    revision and scheduler, with the scheduler's config read from the first image made so."""
    with db.session() as session:
        made = session.execute(
            select(Job.model, Batch.model, Batch.model_revision, Batch.scheduler, func.min(Image.object_key))
            .select_from(Image).join(Job, Job.id == Image.job_id).outerjoin(Batch, Batch.id == Image.batch_id)
            .where(Job.run_id == run_id, Job.state == JobState.SUCCEEDED.value)
            .group_by(Job.model, Batch.model, Batch.model_revision, Batch.scheduler)
            .order_by(Job.model, Batch.model, Batch.model_revision, Batch.scheduler)
            .limit(MAX_MODELS)
        ).all()
    models = []
    for model, model_source, revision, scheduler, key in made:
        try:
            config = png_record(source.get(key)).get("scheduler_config")
        except (StorageError, OSError):  # metadata only: every row still carries its own, checked
            config = None
        models.append({"model": model, "model_source": model_source, "model_revision": revision,
                       "scheduler": scheduler, "scheduler_config": config})
    return models


def png_record(png: bytes) -> dict[str, Any]:
    """The record an sdqueue PNG carries in its text chunk ({} when it has none), read from the
    chunks before the pixels: nothing is decoded."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(png)) as image:
            text = image.info.get(RECORD_CHUNK)
        record = json.loads(text) if isinstance(text, str) else {}
    except (OSError, ValueError, SyntaxError):  # not a PNG, or a record that is not JSON
        return {}
    return record if isinstance(record, dict) else {}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _locate(storage: Storage, key: str) -> str:
    try:
        return storage.location(key)
    except StorageError:  # a key the local folder would not hold: name it as it is
        return key


def _checked_fetch(source: Storage) -> Callable[[dict[str, Any], str], bytes]:
    def fetch(row: dict[str, Any], key: str) -> bytes:
        where = f"image {row['image_index']} of job {row['job_id']} (object {row['object_uri']})"
        try:
            data = source.get(key)
        except (StorageError, OSError) as exc:  # an OSError here is the source's, never the destination's
            raise ExportError(f"{where} cannot be read: {exc}; the export stopped") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            raise ExportError(f"{where} has sha256 {digest} in storage but {row['sha256']} in the database: "
                              "the object was changed or replaced; the export stopped")
        # on the fetching thread, before the writer sees the row
        config = png_record(data).get("scheduler_config")
        row["scheduler_config"] = json.dumps(config, sort_keys=True) if config is not None else None
        return data

    return fetch


def _progress_bar(total: int, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
