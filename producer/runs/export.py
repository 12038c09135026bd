"""A run's images as a dataset: an image folder, WebDataset shards, or a Parquet index alone.

    sdqueue export RUN DEST --format imagefolder|webdataset|parquet

DEST is a folder or an s3://bucket/prefix URI, written through the same storage code as the
images (SDQUEUE_S3_ENDPOINT_URL, SDQUEUE_S3_REGION). The run's succeeded jobs and their images
are read a page at a time, images are fetched from storage a few at a time on threads, each one
checked against the sha256 the database recorded, and written in order: memory stays bounded
whatever the size of the run. Every file is built in a temporary file and then renamed or
uploaded, so a reader never sees half of one. In a folder an export never writes over a file that
is there (unless `force`), and when the disk fails (full, read-only, an I/O error) it removes
every file and folder it made and raises OutputFailed.

Layouts:
- imagefolder: DEST/images/JOBID-INDEX.png and DEST/metadata.jsonl, one line per image with
  `file_name` (what `datasets.load_dataset("imagefolder", data_dir=DEST)` reads).
- webdataset: DEST/00000.tar, 00001.tar, ... of at most `shard_size` samples, each sample
  KEY.png, KEY.txt (the prompt) and KEY.json (its index row); beside each shard its index
  DEST/00000.parquet (the img2dataset convention).
- parquet: DEST/index.parquet, the index alone; the images stay where they are (object_uri).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from sqlalchemy import func, select

from models.db import Database
from models.errors import BadDestination, RunNotFound, SdqueueError, StorageError
from models.settings import Settings
from models.storage import LocalStorage, S3Storage, Storage, open_storage
from models.tables import Batch, Image, Job, JobState, Run
from producer.outputs import OutputFailed, Outputs

FORMATS = ("imagefolder", "webdataset", "parquet")
# Jobs read per query: a page holds at most 4x as many images.
PAGE_JOBS = 500
# Rows per Parquet row group in index.parquet.
ROW_GROUP_ROWS = 4096

# The index columns, in order, with their Arrow type names (one row per image).
COLUMNS: list[tuple[str, str]] = [
    ("job_id", "string"), ("run", "string"), ("key", "string"), ("prompt", "string"),
    ("negative_prompt", "string"), ("mode", "string"), ("num_inference_steps", "int64"),
    ("guidance_scale", "float64"), ("strength", "float64"), ("width", "int64"), ("height", "int64"),
    ("num_images", "int64"), ("use_compel", "bool_"), ("seed", "int64"), ("image_index", "int64"),
    ("model", "string"), ("model_revision", "string"), ("scheduler", "string"), ("object_uri", "string"),
    ("sha256", "string"), ("size_bytes", "int64"), ("batch_id", "string"), ("batch_size", "int64"),
    ("batch_position", "int64"), ("steps_run", "int64"), ("shared_max", "int64"), ("shared_mean", "float64"),
    ("created_at", "string"),
]


class ExportError(SdqueueError):
    """The run cannot be exported as asked (unfinished, a bad option), or an image in storage is
    not the one the database recorded. Whatever was already written stays in DEST."""


@dataclass
class ExportReport:
    run: str
    format: str
    dest: str
    images: int = 0
    jobs: int = 0
    shards: int = 0
    # Jobs of the run not in the dataset, by state (failed, cancelled; queued and running with --partial).
    left_out: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    _last_job: str | None = field(default=None, init=False, repr=False, compare=False)

    def count(self, row: dict[str, Any]) -> None:
        """One more image written (rows come grouped by job)."""
        self.images += 1
        if row["job_id"] != self._last_job:
            self.jobs += 1
            self._last_job = row["job_id"]

    def __str__(self) -> str:
        files = {"webdataset": f"{self.shards} shard(s)", "imagefolder": "images/ + metadata.jsonl",
                 "parquet": "index.parquet"}[self.format]
        left = ", ".join(f"{n} {state}" for state, n in self.left_out.items())
        return (f"exported {self.images} image(s) of {self.jobs} job(s) of run {self.run} to {self.dest} "
                f"as {self.format} ({files}) in {self.seconds:.1f} s"
                + (f"; left out {sum(self.left_out.values())} job(s): {left}" if self.left_out else ""))


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
) -> ExportReport:
    """Write the images of run `run_name` to `dest` as a dataset; see the module's docstring.

    Raises RunNotFound for an unknown run, ExportError for an unfinished run (unless `partial`),
    a bad option, or an image whose bytes do not match its recorded sha256. `progress`: show a
    progress bar on stderr (None: only when stderr is a terminal). `force`: write over an earlier
    export and any file in the way (otherwise BadDestination). OutputFailed when the destination
    folder fails (ENOSPC, EROFS, EIO...): what this export made there was removed.
    """
    # 1. check inputs
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: must be one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ExportError(f"shard_size={shard_size}: must be at least 1")
    if concurrency < 1:
        raise ExportError(f"concurrency={concurrency}: must be at least 1")
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
        target = Destination.open(str(dest), settings, marker={"imagefolder": "metadata.jsonl",
                                                                 "webdataset": "00000.tar",
                                                                 "parquet": "index.parquet"}[format], force=force)
        report = ExportReport(run_name, format, target.url)
        # 4. the images, read page by page, fetched and checked concurrently, written in order
        rows = _index_rows(db, run_id, run_name, source)
        bar = _progress_bar(expected, progress)
        try:
            writer = {"imagefolder": _write_imagefolder, "webdataset": _write_webdataset,
                      "parquet": _write_parquet}[format]
            try:
                writer(rows, source, target, report, shard_size=shard_size, concurrency=concurrency,
                       advance=bar.update if bar is not None else None)
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
    # 5. what was left out: counted at the start; with --partial, jobs that ended meanwhile are
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
                select(Job.id, Job.run_key, Job.mode, Job.params, Job.num_inference_steps, Job.num_images, Job.model)
                .where(Job.run_id == run_id, Job.state == JobState.SUCCEEDED.value, Job.run_key > after)
                .order_by(Job.run_key)
                .limit(PAGE_JOBS)
            ).all()
            if not jobs:
                return
            images = session.execute(
                select(Image, Batch.model_revision, Batch.scheduler)
                .outerjoin(Batch, Batch.id == Image.batch_id)
                .where(Image.job_id.in_([job.id for job in jobs]))
                .order_by(Image.job_id, Image.index)
            ).all()
        by_job: dict[str, list[Any]] = {}
        for image, revision, scheduler in images:
            by_job.setdefault(image.job_id, []).append((image, revision, scheduler))
        for job in jobs:
            params = job.params or {}
            for image, revision, scheduler in by_job.get(job.id, []):
                row = {
                    "job_id": job.id, "run": run_name, "key": job.run_key,
                    "prompt": params.get("prompt", ""), "negative_prompt": params.get("negative_prompt", ""),
                    "mode": job.mode, "num_inference_steps": job.num_inference_steps,
                    "guidance_scale": _float(params.get("guidance_scale")), "strength": _float(params.get("strength")),
                    "width": image.width, "height": image.height, "num_images": job.num_images,
                    "use_compel": bool(params.get("use_compel", False)), "seed": image.seed,
                    "image_index": image.index, "model": job.model, "model_revision": revision,
                    "scheduler": scheduler, "object_uri": _locate(source, image.object_key),
                    "sha256": image.sha256, "size_bytes": image.size_bytes, "batch_id": image.batch_id,
                    "batch_size": image.batch_size, "batch_position": image.batch_position,
                    "steps_run": image.steps_run, "shared_max": image.shared_max, "shared_mean": image.shared_mean,
                    "created_at": image.created_at.isoformat() if image.created_at else None,
                }
                yield row, image.object_key
        after = jobs[-1].run_key


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _locate(storage: Storage, key: str) -> str:
    try:
        return storage.location(key)
    except StorageError:  # a key the local folder would not hold: name it as it is
        return key


def sample_key(row: dict[str, Any]) -> str:
    """JOBID-INDEX: no dot, since WebDataset takes everything after the first dot as the extension."""
    return f"{row['job_id']}-{row['image_index']}"


def _fetched(
    rows: Iterator[tuple[dict[str, Any], str]],
    fetch: Callable[[dict[str, Any], str], bytes],
    concurrency: int,
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(row, fetch(row, key)) in the order of `rows`, with at most 2 x `concurrency` fetches in
    flight or waiting to be written: a slow object holds back the writer, never the memory bound."""
    from concurrent.futures import Future, ThreadPoolExecutor

    window: deque[tuple[dict[str, Any], Future[bytes]]] = deque()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sdqueue-export") as pool:
        try:
            for row, key in rows:
                window.append((row, pool.submit(fetch, row, key)))
                if len(window) >= 2 * concurrency:
                    done, future = window.popleft()
                    yield done, future.result()
            while window:
                done, future = window.popleft()
                yield done, future.result()
        finally:  # stopped early (an error): nothing more starts
            for _, future in window:
                future.cancel()


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
        return data

    return fetch


def _progress_bar(total: int, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


# --- where the dataset goes -------------------------------------------------------------------

class Destination:
    """A folder or an S3 prefix: each file built in a temporary file and then renamed into place
    (a folder: never over a file that is there, unless forced) or uploaded (S3)."""

    def __init__(self, storage: Storage, outputs: Outputs):
        self.storage = storage
        self.folder = storage.root if isinstance(storage, LocalStorage) else None
        self.url = str(self.folder) if self.folder is not None else storage.url
        self.outputs = outputs  # what was made in the folder, for `undo`

    @classmethod
    def open(cls, dest: str, settings: Settings, *, marker: str, force: bool = False) -> Destination:
        """The destination, refused before anything is read when it cannot be written or
        already holds an export (`marker`, the first file an export of this format writes)
        and not `force`."""
        scheme = urlparse(dest).scheme if "://" in dest else ""
        if scheme in ("s3", "file"):
            storage = open_storage(dest, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        elif scheme:
            raise BadDestination(f"destination {dest!r}: give a folder, file:///folder or s3://bucket/prefix")
        else:
            storage = LocalStorage(Path(dest))
        target = cls(storage, Outputs(force=force))
        if target.folder is not None:
            target.outputs.folder(target.folder)
        if not force and storage.exists(marker):
            raise BadDestination(f"destination {target.url} already holds an export ({marker}): "
                                 "give an empty folder, a new prefix, or --force to write over it")
        return target

    def put(self, name: str, data: bytes, content_type: str) -> None:
        if self.folder is None:
            self.storage.put(name, data, content_type)
            return
        path = self.folder / name
        self.outputs.folder(path.parent)
        self.outputs.write_bytes(path, data)

    def temporary(self, name: str) -> Path:
        """A new empty file to build `name` in: beside it in a folder (renamed atomically), in
        the system's temporary folder for S3."""
        if self.folder is not None:
            path = self.folder / name
            self.outputs.folder(path.parent)
            return self.outputs.temporary(path)
        fd, part = tempfile.mkstemp(prefix=f".{Path(name).name}.", suffix=".part")
        os.close(fd)
        return Path(part)

    def commit(self, path: Path, name: str, content_type: str) -> None:
        """`path` (from `temporary`) becomes `name`; the temporary file is gone either way."""
        try:
            if self.folder is not None:
                self.outputs.place(path, self.folder / name)
                return
            assert isinstance(self.storage, S3Storage)
            key = self.storage.location(name).removeprefix(f"s3://{self.storage.bucket}/")
            try:  # multipart for large shards, streamed from the file
                self.storage.client.upload_file(str(path), self.storage.bucket, key,
                                                ExtraArgs={"ContentType": content_type})
            except Exception as exc:
                raise StorageError(f"upload of {name!r} to {self.storage.url} failed: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)

    def undo(self) -> None:
        """Remove what this export made in the folder (objects put in S3 stay)."""
        self.outputs.undo()


# --- the three formats ------------------------------------------------------------------------

def _write_imagefolder(rows: Iterator[tuple[dict[str, Any], str]], source: Storage, target: Destination,
                       report: ExportReport, *, shard_size: int, concurrency: int,
                       advance: Callable[[int], Any] | None) -> None:
    check = _checked_fetch(source)

    def copy(row: dict[str, Any], key: str) -> bytes:
        # checked and put on the fetching thread: the images go up concurrently, and only the
        # metadata line waits for the writer
        target.put(row["file_name"], check(row, key), "image/png")
        return b""

    def named() -> Iterator[tuple[dict[str, Any], str]]:
        for row, key in rows:
            yield {"file_name": f"images/{sample_key(row)}.png", **row}, key

    metadata = target.temporary("metadata.jsonl")
    try:
        # closing: on an error no fetch thread is still writing when the caller cleans up
        with open(metadata, "w", encoding="utf-8") as f, closing(_fetched(named(), copy, concurrency)) as fetched:
            for row, _ in fetched:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                _count(report, row, advance)
        target.commit(metadata, "metadata.jsonl", "application/jsonl")
    finally:
        metadata.unlink(missing_ok=True)


def _write_webdataset(rows: Iterator[tuple[dict[str, Any], str]], source: Storage, target: Destination,
                      report: ExportReport, *, shard_size: int, concurrency: int,
                      advance: Callable[[int], Any] | None) -> None:
    shard: _Shard | None = None
    try:
        with closing(_fetched(rows, _checked_fetch(source), concurrency)) as fetched:
            for row, data in fetched:
                if shard is None:
                    shard = _Shard(target, report.shards)
                shard.add(row, data)
                _count(report, row, advance)
                if len(shard.rows) >= shard_size:
                    shard.close()
                    report.shards += 1
                    shard = None
        if shard is not None:
            shard.close()
            report.shards += 1
            shard = None
    finally:
        if shard is not None:
            shard.discard()


class _Shard:
    """One tar shard being built in a temporary file, and the rows of its Parquet index."""

    def __init__(self, target: Destination, number: int):
        self.target = target
        self.name = f"{number:05d}"
        self.path = target.temporary(f"{self.name}.tar")
        self.tar = tarfile.open(self.path, "w")
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any], png: bytes) -> None:
        key = sample_key(row)
        mtime = int(time.time())
        for extension, data in (("png", png), ("txt", row["prompt"].encode("utf-8")),
                                ("json", json.dumps(row, ensure_ascii=False).encode("utf-8"))):
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.rows.append(row)

    def close(self) -> None:
        self.tar.close()
        index = self.target.temporary(f"{self.name}.parquet")
        try:
            import pyarrow.parquet as pq

            pq.write_table(_table(self.rows), index)
            # the index after its shard: an index file always names a shard that is there
            self.target.commit(self.path, f"{self.name}.tar", "application/x-tar")
            self.target.commit(index, f"{self.name}.parquet", "application/vnd.apache.parquet")
        finally:
            index.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        try:
            self.tar.close()
        except OSError:  # the disk that failed the shard fails its end too: it goes anyway
            pass
        finally:
            self.path.unlink(missing_ok=True)


def _write_parquet(rows: Iterator[tuple[dict[str, Any], str]], source: Storage, target: Destination,
                   report: ExportReport, *, shard_size: int, concurrency: int,
                   advance: Callable[[int], Any] | None) -> None:
    import pyarrow.parquet as pq

    path = target.temporary("index.parquet")
    try:
        with pq.ParquetWriter(path, _schema()) as writer, \
                closing(_fetched(rows, _checked_fetch(source), concurrency)) as fetched:
            group: list[dict[str, Any]] = []
            # the images are fetched too: an index whose digests were not checked is not written
            for row, _ in fetched:
                group.append(row)
                _count(report, row, advance)
                if len(group) >= ROW_GROUP_ROWS:
                    writer.write_table(_table(group))
                    group = []
            if group:
                writer.write_table(_table(group))
        target.commit(path, "index.parquet", "application/vnd.apache.parquet")
        report.shards = 1
    finally:
        path.unlink(missing_ok=True)


def _count(report: ExportReport, row: dict[str, Any], advance: Callable[[int], Any] | None) -> None:
    report.count(row)
    if advance is not None:
        advance(1)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist([{name: row[name] for name, _ in COLUMNS} for row in rows], schema=_schema())
