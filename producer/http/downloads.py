"""What fetch and export_run write: a job's images and an export's tar stream unpacked into a
folder, by the CLI's rules (producer/outputs.py): each file whole or absent, none outside the
folder, and what a failed call wrote removed."""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from producer.http.errors import ApiError
from producer.http.records import Image, Job


def image_targets(job: Job, dest: Path, force: bool) -> list[Path]:
    """The job's images' paths in `dest` (JOBID-INDEX.png); BadDestination for one that is in the way."""
    from models.errors import BadDestination

    targets = [dest / f"{job.id}-{image.index}.png" for image in job.images]
    for path in targets:
        if path.exists() and not path.is_file():
            raise BadDestination(f"destination {str(path)!r} exists and is not a regular file")
        if path.exists() and not force:
            raise BadDestination(f"destination {str(path)!r} exists (--force writes over it)")
    return targets


def checked(image: Image, data: bytes) -> bytes:
    """The image's bytes as downloaded, once they match its recorded sha256."""
    import hashlib

    if image.sha256 is not None and hashlib.sha256(data).hexdigest() != image.sha256:
        raise ApiError(f"image {image.index} as downloaded ({len(data)} bytes) does not match its recorded "
                       "sha256: nothing of it was kept")
    return data


def export_folder(dest: Path, force: bool) -> None:
    """BadDestination, before anything is downloaded, for a folder an export may not write into."""
    from models.errors import BadDestination

    if dest.exists() and not dest.is_dir():
        raise BadDestination(f"destination {str(dest)!r} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise BadDestination(f"destination {str(dest)!r} is not empty (--force writes over what is there)")


def extract(stream: io.BufferedIOBase, dest: Path, force: bool) -> list[Path]:
    """The export's tar stream into `dest`: the files of its one top folder (RUN-FORMAT/), so that
    `dest` holds the dataset as `sdqueue export` writes it. Each file whole or not at all, none
    outside `dest`, nothing but folders and regular files; on any failure what was written is removed."""
    import tarfile  # imported here, as tempfile in AsyncClient.export_run: `sdqueue status` needs neither

    from producer.outputs import Outputs

    out = Outputs(force=force)
    written: list[Path] = []
    try:
        with out.all_or_nothing("the files this export wrote"):
            out.folder(dest)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                top = None
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if not parts or member.name.startswith("/") or ".." in parts or top not in (None, parts[0]):
                        raise ApiError(f"the export names {member.name!r}, a path outside its folder: nothing was kept")
                    top = parts[0]
                    if len(parts) == 1 and member.isdir():
                        continue  # the top folder: `dest` itself
                    path = dest.joinpath(*parts[1:] if len(parts) > 1 else parts)
                    if member.isdir():
                        out.folder(path)
                    elif member.isfile():
                        out.folder(path.parent)
                        source = tar.extractfile(member)
                        assert source is not None
                        with out.file(path) as part, open(part, "wb") as target:
                            while chunk := source.read(1 << 20):
                                target.write(chunk)
                        written.append(path)
                    else:
                        raise ApiError(f"the export holds {member.name!r}, neither a file nor a folder: nothing was kept")
    except tarfile.TarError as exc:  # everything written was removed already
        raise ApiError(f"the export is not a whole tar stream ({exc}): nothing was kept") from None
    return written


class Chunks(io.RawIOBase):
    """An iterator of bytes as a readable file (tarfile's stream mode reads one)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            try:
                self._left = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n], self._left = self._left[:n], self._left[n:]
        return n
