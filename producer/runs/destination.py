"""Where an export goes: a folder or an S3 prefix (`Destination`), each file built in a temporary
file and then renamed into place or uploaded, so a reader never sees half of one.

In a folder the files are written through producer/outputs.py: never over a file that is there
unless forced, and `undo` removes every file and folder the export made. `prune` removes the
shards of an earlier export that a forced one did not write over.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from models.errors import BadDestination, StorageError
from models.settings import Settings
from models.storage import LocalStorage, S3Storage, Storage, open_storage
from producer.outputs import Outputs


class Destination:
    """A folder or an S3 prefix: each file built in a temporary file and then renamed into place
    (a folder: never over a file that is there, unless forced) or uploaded (S3)."""

    def __init__(self, storage: Storage, outputs: Outputs):
        self.storage = storage
        self.folder = storage.root if isinstance(storage, LocalStorage) else None
        self.url = str(self.folder) if self.folder is not None else storage.url
        self.outputs = outputs  # what was made in the folder, for `undo`
        self.committed: set[str] = set()  # names of the files built whole (shards, indexes): a few per 1,000 rows

    @classmethod
    def open(cls, dest: str, settings: Settings, *, markers: Sequence[str], force: bool = False) -> Destination:
        """The destination, refused before anything is read when it cannot be written or
        already holds an export (one of `markers`: files an export of this format always
        writes, or a folder ending in / that holds any file) and not `force`."""
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
        for marker in markers if not force else ():
            if target.holds(marker):
                raise BadDestination(f"destination {target.url} already holds an export ({marker}): "
                                     "give an empty folder, a new prefix, or --force to write over it")
        return target

    def holds(self, name: str) -> bool:
        """Whether file `name` is there, or for a name ending in /, any file under it."""
        if not name.endswith("/"):
            return self.storage.exists(name)
        if self.folder is not None:
            return any(path.is_file() for path in (self.folder / name).glob("*"))
        assert isinstance(self.storage, S3Storage)
        prefix = self.storage.location(name.rstrip("/")).removeprefix(f"s3://{self.storage.bucket}/") + "/"
        try:
            listed = self.storage.client.list_objects_v2(Bucket=self.storage.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            raise StorageError(f"listing {prefix!r} in {self.storage.url} failed: {exc}") from exc
        return bool(listed.get("KeyCount") or listed.get("Contents"))

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
                self.committed.add(name)
                return
            assert isinstance(self.storage, S3Storage)
            key = self.storage.location(name).removeprefix(f"s3://{self.storage.bucket}/")
            try:  # multipart for large shards, streamed from the file
                self.storage.client.upload_file(str(path), self.storage.bucket, key,
                                                ExtraArgs={"ContentType": content_type})
            except Exception as exc:
                raise StorageError(f"upload of {name!r} to {self.storage.url} failed: {exc}") from exc
            self.committed.add(name)
        finally:
            path.unlink(missing_ok=True)

    def undo(self) -> None:
        """Remove what this export made in the folder (objects put in S3 stay)."""
        self.outputs.undo()

    def prune(self, folder: str, pattern: re.Pattern[str]) -> None:
        """Remove the files directly in `folder` whose name (from the top) matches `pattern` and
        that this export did not write: an earlier export's shards, which a reader globbing the
        folder would otherwise mix with these (after a --force export with fewer of them)."""
        def stale(name: str) -> bool:
            return bool(pattern.fullmatch(name)) and name not in self.committed

        if self.folder is not None:
            if (self.folder / folder).is_dir():
                for path in (self.folder / folder).iterdir():
                    if path.is_file() and stale(folder + path.name):
                        path.unlink(missing_ok=True)
            return
        assert isinstance(self.storage, S3Storage)
        top = self.storage.location("x")[:-1].removeprefix(f"s3://{self.storage.bucket}/")
        try:
            pages = self.storage.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.storage.bucket, Prefix=top + folder, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", []):
                    if stale(item["Key"].removeprefix(top)):
                        self.storage.client.delete_object(Bucket=self.storage.bucket, Key=item["Key"])
        except Exception as exc:
            raise StorageError(f"removing an earlier export's files from {self.storage.url} failed: {exc}") from exc
