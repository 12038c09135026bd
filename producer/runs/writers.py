"""The four export formats, written to a Destination: image folders, WebDataset shards with their
Parquet indexes, Parquet files and `save_to_disk` Arrow files, with the Arrow schema and the
Hugging Face features they carry (layouts: producer/runs/export.py).

Each writer takes the run's rows in order and a checked `fetch`, fetches the images a bounded
window ahead on threads (`_fetched`), writes them in the rows' order and counts them in the
ExportReport.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from producer.runs.destination import Destination
from producer.runs.splits import Splits

# A row's image, read and checked against its recorded sha256 (export.py's `_checked_fetch`):
# (row, object key) -> the PNG's bytes.
Fetch = Callable[[dict[str, Any], str], bytes]

# A group of rows with their images (a Parquet row group, an Arrow record batch) ends at whichever
# comes first: 100 rows (what `datasets` uses for images) or 16 MiB of images. Up to 8 splits
# fill a group each at once.
GROUP_ROWS = 100
GROUP_BYTES = 16 << 20

# Shards an earlier export may have left that `--force` removes (folder, names from the top):
# a reader globbing the folder would mix them with the new ones.
STALE = {"webdataset": ("", re.compile(r"(\d{5}|[A-Za-z]\w*-\d{6})\.(tar|parquet)")),
         "parquet": ("data/", re.compile(r"data/[A-Za-z]\w*-\d{5}-of-\d{5}\.parquet"))}

# The index columns, in order, with their Arrow type names (one row per image).
COLUMNS: list[tuple[str, str]] = [
    ("text", "string"), ("job_id", "string"), ("run", "string"), ("key", "string"), ("prompt", "string"),
    ("negative_prompt", "string"), ("mode", "string"), ("input_sha256", "string"), ("mask_sha256", "string"),
    ("depth_sha256", "string"), ("after_job_id", "string"), ("after_index", "int64"),
    ("num_inference_steps", "int64"),
    ("guidance_scale", "float64"), ("strength", "float64"), ("width", "int64"), ("height", "int64"),
    ("num_images", "int64"), ("use_compel", "bool_"), ("seed", "int64"), ("image_index", "int64"),
    ("model", "string"), ("model_revision", "string"), ("scheduler", "string"), ("scheduler_config", "string"),
    ("model_source", "string"), ("versions", "string"), ("object_uri", "string"), ("sha256", "string"),
    ("pixel_sha256", "string"), ("size_bytes", "int64"), ("batch_id", "string"), ("batch_size", "int64"),
    ("batch_position", "int64"), ("steps_run", "int64"), ("shared_max", "int64"), ("shared_mean", "float64"),
    ("created_at", "string"),
]


# --- what the formats share --------------------------------------------------------------------

@dataclass
class ExportReport:
    """What an export wrote, counted by the writers as they go; its str is the summary line."""

    run: str
    format: str
    dest: str
    images: int = 0
    jobs: int = 0
    shards: int = 0
    # Images per split, when split.
    splits: dict[str, int] = field(default_factory=dict)
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
                 "parquet": f"{self.shards} Parquet file(s)", "hf": f"{self.shards} Arrow file(s)"}[self.format]
        left = ", ".join(f"{n} {state}" for state, n in self.left_out.items())
        splits = ", ".join(f"{name} {n}" for name, n in self.splits.items())
        return (f"exported {self.images} image(s) of {self.jobs} job(s) of run {self.run} to {self.dest} "
                f"as {self.format} ({files}) in {self.seconds:.1f} s"
                + (f"; split: {splits}" if self.splits else "")
                + (f"; left out {sum(self.left_out.values())} job(s): {left}" if self.left_out else ""))


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


# --- the four formats -------------------------------------------------------------------------

@dataclass
class Options:
    shard_size: int
    concurrency: int
    splits: Splits | None
    about: dict[str, Any]  # the schema metadata's `sdqueue` entry
    advance: Callable[[int], Any] | None


def markers(format: str, splits: Splits | None) -> list[str]:
    """Files an export of `format` always writes (split or not, so neither kind is mixed with
    the other), or a folder whose files it names."""
    names = splits.names if splits is not None else []
    return {"imagefolder": ["metadata.jsonl", *(f"{name}/metadata.jsonl" for name in names)],
            "webdataset": ["00000.tar", *(f"{name}-000000.tar" for name in names)],
            "parquet": ["data/"],
            "hf": ["state.json", "dataset_dict.json"]}[format]


def _split_of(options: Options, row: dict[str, Any], report: ExportReport) -> str | None:
    if options.splits is None:
        return None
    name = options.splits.of(row["key"])
    report.splits[name] += 1
    return name


def write_imagefolder(rows: Iterator[tuple[dict[str, Any], str]], fetch: Fetch, target: Destination,
                      report: ExportReport, options: Options) -> None:
    folders = [f"{name}/" for name in options.splits.names] if options.splits is not None else [""]

    def copy(row: dict[str, Any], where: tuple[str, str]) -> bytes:
        # checked and put on the fetching thread: the images go up concurrently, and only the
        # metadata line waits for the writer
        folder, key = where
        target.put(folder + row["file_name"], fetch(row, key), "image/png")
        return b""

    def named() -> Iterator[tuple[dict[str, Any], tuple[str, str]]]:
        for row, key in rows:
            split = _split_of(options, row, report)
            yield {"file_name": f"images/{sample_key(row)}.png", **row}, (f"{split}/" if split else "", key)

    metadata = {folder: target.temporary(f"{folder}metadata.jsonl") for folder in folders}
    try:
        files = {folder: open(path, "w", encoding="utf-8") for folder, path in metadata.items()}
        try:
            # closing: on an error no fetch thread is still writing when the caller cleans up
            with closing(_fetched(named(), copy, options.concurrency)) as fetched:
                for row, _ in fetched:
                    # the folder is not in the row: the split comes from its key again
                    folder = f"{options.splits.of(row['key'])}/" if options.splits is not None else ""
                    files[folder].write(json.dumps(row, ensure_ascii=False) + "\n")
                    _count(report, row, options.advance)
        finally:
            for f in files.values():
                f.close()
        for folder, path in metadata.items():
            target.commit(path, f"{folder}metadata.jsonl", "application/jsonl")
    finally:
        for path in metadata.values():
            path.unlink(missing_ok=True)


def write_webdataset(rows: Iterator[tuple[dict[str, Any], str]], fetch: Fetch, target: Destination,
                     report: ExportReport, options: Options) -> None:
    shards: dict[str | None, _Shard] = {}  # the open shard of each split
    numbers: dict[str | None, int] = {}
    try:
        with closing(_fetched(rows, fetch, options.concurrency)) as fetched:
            for row, data in fetched:
                split = _split_of(options, row, report)
                shard = shards.get(split)
                if shard is None:
                    number = numbers.get(split, 0)
                    numbers[split] = number + 1
                    shard = shards[split] = _Shard(target, f"{split}-{number:06d}" if split else f"{number:05d}")
                shard.add(row, data)
                _count(report, row, options.advance)
                if len(shard.rows) >= options.shard_size:
                    del shards[split]
                    shard.close()
                    report.shards += 1
        while shards:
            _, shard = shards.popitem()
            shard.close()
            report.shards += 1
    finally:
        for shard in shards.values():
            shard.discard()


class _Shard:
    """One tar shard being built in a temporary file, and the rows of its Parquet index."""

    def __init__(self, target: Destination, name: str):
        self.target = target
        self.name = name
        self.path = target.temporary(f"{self.name}.tar")
        self.tar = tarfile.open(self.path, "w")
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any], png: bytes) -> None:
        key = sample_key(row)
        mtime = int(time.time())
        for extension, data in (("png", png), ("txt", row["prompt"].encode("utf-8")),
                                ("json", json.dumps(row, ensure_ascii=False).encode("utf-8"))):
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644  # readable by all, as the files
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


def write_parquet(rows: Iterator[tuple[dict[str, Any], str]], fetch: Fetch, target: Destination,
                  report: ExportReport, options: Options) -> None:
    names = options.splits.names if options.splits is not None else ["train"]
    tables = {name: _Tables(target, "parquet", options.shard_size, options.about,
                            lambda i, n, name=name: f"data/{name}-{i:05d}-of-{n:05d}.parquet") for name in names}
    try:
        _fill(rows, fetch, report, options, tables)
        for each in tables.values():
            report.shards += len(each.commit())
    finally:
        for each in tables.values():
            each.discard()


def write_hf(rows: Iterator[tuple[dict[str, Any], str]], fetch: Fetch, target: Destination,
             report: ExportReport, options: Options) -> None:
    """The files `Dataset.save_to_disk` writes (datasets' arrow_dataset.py), or with splits those
    of `DatasetDict.save_to_disk` (dataset_dict.py): Arrow IPC streams whose schema carries the
    features, and the JSON state `load_from_disk` reads first."""
    folders = {name: f"{name}/" for name in options.splits.names} if options.splits is not None else {None: ""}
    tables = {split: _Tables(target, "arrow", options.shard_size, options.about,
                             lambda i, n, folder=folder: f"{folder}data-{i:05d}-of-{n:05d}.arrow")
              for split, folder in folders.items()}
    try:
        _fill(rows, fetch, report, options, tables)
        for split, folder in folders.items():
            files = tables[split].commit()
            report.shards += len(files)
            state = {"_data_files": [{"filename": name.rsplit("/", 1)[-1]} for name in files],
                     "_fingerprint": tables[split].fingerprint(), "_format_columns": None, "_format_kwargs": {},
                     "_format_type": None, "_output_all_columns": False, "_split": split}
            info = {"citation": "", "description": f"sdqueue run {report.run}", "features": _features(),
                    "homepage": "", "license": ""}
            if split is not None:
                info["splits"] = {split: {"name": split, "num_bytes": tables[split].bytes,
                                          "num_examples": tables[split].rows, "dataset_name": None}}
            target.put(f"{folder}state.json", json.dumps(state, indent=2, sort_keys=True).encode(), "application/json")
            target.put(f"{folder}dataset_info.json", json.dumps(info, indent=2).encode(), "application/json")
        if options.splits is not None:  # last: a DatasetDict is there once all its splits are
            target.put("dataset_dict.json", json.dumps({"splits": options.splits.names}).encode(), "application/json")
    finally:
        for each in tables.values():
            each.discard()


def _fill(rows: Iterator[tuple[dict[str, Any], str]], fetch: Fetch, report: ExportReport, options: Options,
          tables: dict[Any, _Tables]) -> None:
    with closing(_fetched(rows, fetch, options.concurrency)) as fetched:
        for row, data in fetched:
            split = _split_of(options, row, report)
            tables[split if options.splits is not None else next(iter(tables))].add(row, data)
            _count(report, row, options.advance)


class _Tables:
    """The Parquet or Arrow (IPC stream) files of one split: each of at most `shard_size` rows,
    written a bounded group of rows at a time, kept under temporary names until the last is done
    and their number known for their names (`name(index, count)`)."""

    def __init__(self, target: Destination, kind: str, shard_size: int, about: dict[str, Any],
                 name: Callable[[int, int], str]):
        self.target, self.kind, self.shard_size, self.name = target, kind, shard_size, name
        self.schema = _image_schema(about)
        self.done: list[Path] = []  # finished files, not yet named
        self.part: Path | None = None
        self.sink: Any = None
        self.writer: Any = None
        self.in_file = 0
        self.group: list[dict[str, Any]] = []
        self.group_bytes = 0
        self.rows = 0
        self.bytes = 0
        self._digest = hashlib.sha256()

    def add(self, row: dict[str, Any], png: bytes) -> None:
        if self.writer is None:
            self._open()
        self.group.append({"image": {"bytes": png, "path": f"{sample_key(row)}.png"},
                           **{name: row[name] for name, _ in COLUMNS}})
        self.group_bytes += len(png)
        self.in_file += 1
        self.rows += 1
        self._digest.update(row["sha256"].encode())
        if len(self.group) >= GROUP_ROWS or self.group_bytes >= GROUP_BYTES or self.in_file >= self.shard_size:
            self._flush()
        if self.in_file >= self.shard_size:
            self._close()

    def fingerprint(self) -> str:
        """What `datasets` keys its caches on: the same rows, the same fingerprint."""
        return self._digest.hexdigest()[:16]

    def commit(self) -> list[str]:
        """Name the files (one, empty, for a split without rows: the split is there); their names."""
        if self.writer is None and not self.done:
            self._open()
        self._flush()
        self._close()
        names = [self.name(i, len(self.done)) for i in range(len(self.done))]
        content = "application/vnd.apache.parquet" if self.kind == "parquet" else "application/vnd.apache.arrow.stream"
        for path, name in zip(self.done, names):
            self.target.commit(path, name, content)  # the temporary file is gone either way
        self.done = []
        return names

    def discard(self) -> None:
        for end in (self.writer, self.sink):
            try:
                if end is not None:
                    end.close()
            except Exception:  # the disk that failed the file fails its end too: it goes anyway
                pass
        for path in [*self.done, *([self.part] if self.part is not None else [])]:
            path.unlink(missing_ok=True)
        self.writer = self.sink = self.part = None
        self.done = []

    def _open(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.part = self.target.temporary(self.name(len(self.done), 0))  # its count is not known yet
        self.sink = open(self.part, "wb")
        self.writer = (pq.ParquetWriter(self.sink, self.schema) if self.kind == "parquet"
                       else pa.ipc.new_stream(self.sink, self.schema))
        self.in_file = 0

    def _flush(self) -> None:
        if self.group:
            import pyarrow as pa

            table = pa.Table.from_pylist(self.group, schema=self.schema)
            self.bytes += table.nbytes
            self.writer.write_table(table)
            self.group, self.group_bytes = [], 0

    def _close(self) -> None:
        if self.writer is not None:
            assert self.part is not None
            self.writer.close()
            self.sink.close()
            self.done.append(self.part)
            self.writer = self.sink = self.part = None


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


def _features() -> dict[str, Any]:
    """The columns as `datasets` Features (what `Features.to_dict` gives): the image first."""
    dtypes = {"bool_": "bool"}
    return {"image": {"_type": "Image"},
            **{name: {"dtype": dtypes.get(kind, kind), "_type": "Value"} for name, kind in COLUMNS}}


def _image_schema(about: dict[str, Any]) -> Any:
    """The schema of rows with their image in the `datasets` Image layout; its metadata holds the
    features, as datasets' ArrowWriter writes them, and the run's models."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("image", image), *_schema()], metadata={
        "huggingface": json.dumps({"info": {"features": _features()}}),
        "sdqueue": json.dumps(about, sort_keys=True),
    })
